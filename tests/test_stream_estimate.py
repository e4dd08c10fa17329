"""The stream engine's GPU memory model (``hf_lowmem.engine.stream.estimate_stream_memory``, which the planner
defers to) against measurements.

1. Measured on one H200 (torch 2.11+cu130): ``torch.cuda.max_memory_allocated()`` over a whole stream run with
   Llama-2-7B layer shapes (hidden 4096, MLP 11008, vocab 32000), seq 2048, micro-batch 4, bf16 compute, 8-bit
   AdamW states, loss chunks of 2048 tokens:

   - 8 layers, accumulation 2: 4.105 GiB (``bench/results/planner_accuracy.json``, row r7);
   - 16 layers, accumulation 8: 4.49 GiB (``bench/results/stream_16l_vs_deepspeed.json`` and
     ``bench/results/raw/stream_16l_ga8.json``);
   - 32 layers, accumulation 8: 4.49 GiB (``bench/results/raw/stream_7b_first.json``, ``stream_7b_second.json``).

   The peak does not move with the layer count, and 6 more micro-batches of 8,192 tokens add ~0.385 GiB: one
   copy of their hidden states (6 x 8,192 x 4096 x 2 bytes = 0.375 GiB). The model must say the same.

2. On the CPU the engine runs the same code with its "device" tensors as clones of the pinned-host masters, so
   the CPU allocator's peak of live bytes during an optimizer step, over what existed before it (masters,
   states, stash), is the quantity the model predicts without its CUDA-only cuBLAS workspace term.
"""

from __future__ import annotations

import pytest
import torch

from hf_lowmem.engine.stream import estimate_stream_memory
from hf_lowmem.planner import load_model_shape, preset_config

GiB = 2**30
MEASURED_H200 = [  # (decoder layers, accumulation, peak allocated GiB, where it is recorded)
    (8, 2, 4.105, "bench/results/planner_accuracy.json r7"),
    (16, 8, 4.49, "bench/results/stream_16l_vs_deepspeed.json"),
    (32, 8, 4.49, "bench/results/raw/stream_7b_second.json"),
]


def _llama7b_estimate(layers: int, ga: int, **kw) -> dict:
    sh = load_model_shape(preset_config("llama2-7b", num_hidden_layers=layers))
    return estimate_stream_memory(block_params=sh.block_params(), hidden_size=sh.hidden,
                                  intermediate_size=sh.intermediate, vocab_size=sh.vocab,
                                  tokens_per_micro_batch=4 * 2048, micro_batches=ga, compute_bytes=2,
                                  state_format="8bit", **kw)


@pytest.mark.parametrize("layers,ga,measured,source", MEASURED_H200)
def test_estimate_matches_the_h200_measurements(layers, ga, measured, source):
    est = _llama7b_estimate(layers, ga)
    err = (est["gpu_bytes"] / GiB - measured) / measured
    # within 10%, and never optimistic by more than 5% (the engine refuses to start on this estimate)
    assert -0.05 <= err <= 0.10, f"{source}: predicted {est['gpu_bytes'] / GiB:.3f} GiB, measured {measured} GiB"
    assert est["gpu_peak_phase"].startswith("backward"), est["gpu_phases"]


def test_layer_count_and_accumulation_move_the_estimate_as_measured():
    by_layers = {n: _llama7b_estimate(n, 8)["gpu_bytes"] for n in (4, 16, 32)}
    assert len(set(by_layers.values())) == 1, by_layers  # measured: 4.49 GiB at 16 and at 32 layers
    step = (_llama7b_estimate(8, 8)["gpu_bytes"] - _llama7b_estimate(8, 2)["gpu_bytes"]) / GiB
    measured_step = 4.49 - 4.105
    assert abs(step - measured_step) <= 0.1 * measured_step, step


def test_planner_defers_to_the_engine_model_for_r7():
    from hf_lowmem.context import resolve_selection
    from hf_lowmem.planner import PlanInput, TrainSetup, estimate_memory
    from hf_lowmem.plugins import load_plugins

    host = load_plugins()
    if "stream" not in host.registry:
        pytest.skip("the stream plugin is not registered")
    shape = load_model_shape(preset_config("llama2-7b", num_hidden_layers=8))
    setup = TrainSetup(micro_batch=4, seq_len=2048, grad_accum=2, precision="bf16-mixed", device="cuda")
    sel = resolve_selection(host, {"optimizer": ["bnb-adamw8bit"], "offload": ["stream"]}, {}, "single")
    inp = PlanInput(shape, setup, {k: tuple(v) for k, v in sel.by_kind.items()}, dict(sel.options))
    est = estimate_memory(inp, host)
    assert abs(est.gpu_peak_allocated / GiB - 4.105) <= 0.10 * 4.105  # r7 measured on the H200
    assert est.gpu_peak_allocated == _llama7b_estimate(8, 2)["gpu_bytes"]


# ---- the CPU allocator ---------------------------------------------------------------------------------------
def _cpu_window_peak(tmp_path, hidden, inter, layers, vocab, seq, mb, ga, tied, stream=None):
    """(measured, predicted) bytes of the engine's device tensors in the 2nd optimizer step, bf16 compute."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from hf_lowmem import LowMemTrainer
    from tests.tiny import RandomTokens, train_args

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=hidden // 64,
                               num_key_value_heads=hidden // 64, max_position_embeddings=seq,
                               tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    probe: dict = {}

    class SecondStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                probe["prof"] = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                probe["prof"].__enter__()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                probe["prof"].__exit__(None, None, None)
                events = sorted((e.start_ns(), e.nbytes()) for e in probe["prof"].profiler.kineto_results.events()
                                if e.name() == "[memory]")
                cur = peak = 0
                for _, b in events:
                    cur += b
                    peak = max(peak, cur)
                probe["peak"] = peak

    trainer = LowMemTrainer(model=model, args=train_args(tmp_path, max_steps=2, per_device_train_batch_size=mb,
                                                         gradient_accumulation_steps=ga, bf16=True,
                                                         lowmem_offload=["stream"],
                                                         lowmem_options={"stream": stream or {}}),
                            train_dataset=RandomTokens(n=64, seq=seq, vocab=vocab), callbacks=[SecondStep()])
    trainer.train()
    est = trainer.lowmem_engine.estimate(mb * seq, ga)
    return probe["peak"], est["gpu_bytes"] - est["gpu"]["framework"], est["gpu_peak_phase"]


@pytest.mark.parametrize("shape", [
    dict(hidden=512, inter=1376, layers=2, vocab=1000, seq=512, mb=2, ga=2, tied=False),  # a layer's backward
    dict(hidden=256, inter=688, layers=2, vocab=4000, seq=256, mb=2, ga=2, tied=True),  # the LM head, tied
    dict(hidden=512, inter=1376, layers=4, vocab=1000, seq=512, mb=2, ga=2, tied=False,
         stream={"stash_every": 2}),  # a group of two layers' backward
    dict(hidden=512, inter=1376, layers=4, vocab=1000, seq=512, mb=2, ga=2, tied=False,
         stream={"tier": "compact", "stash_every": 2}),  # bf16 masters, 4-bit states, 8-bit gradients
], ids=["layer-backward", "tied-head", "stash2", "compact-stash2"])
def test_estimate_matches_the_cpu_allocator(tmp_path, shape):
    measured, predicted, phase = _cpu_window_peak(tmp_path, **shape)
    err = (predicted - measured) / measured
    assert -0.05 <= err <= 0.15, f"{phase}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"
    assert phase.startswith("backward" if not shape["tied"] else "head")
