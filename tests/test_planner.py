"""The memory planner, kept honest on the CPU.

* Activations: per decoder layer, the bytes the planner predicts equal what autograd really saves
  (``saved_tensors_hooks`` byte counts, storages de-duplicated, parameters excluded), for fp32, bf16 and
  bf16 autocast, SDPA and eager attention, with and without grouped-query attention. Tolerance: 1%.
* A whole training step: the predicted peak equals the peak of live bytes the CPU allocator reports
  (profiler memory events, on top of the parameter and optimizer-state bytes counted before the step),
  with the Trainer's own loop and plugins (checkpointing, chunked loss, gradient accumulation).
  Tolerance: 5% (what we see is under 1%).
* Model state after a step: parameters + gradients + optimizer states, counted tensor by tensor, equal the
  prediction exactly.
* The H200 figures in ``shared/notes/measurements.md`` (stock Trainer, Llama-2-7B shape): within 5%.
* Planning: the fastest plan that fits, the error with the smallest budget, plugin-provided memory models,
  ``LowMemTrainingArguments(lowmem_gpu_memory=...)`` and the CLI.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from hf_lowmem import planner
from hf_lowmem.errors import MemoryBudgetError, PluginError
from hf_lowmem.planner import (PlanInput, TrainSetup, estimate_memory, load_model_shape, parse_size,
                               plan_training)
from tests.tiny import RandomTokens, tiny_config, train_args

GiB = 2**30


# ---- sizes and shapes -------------------------------------------------------------------------------
def test_parse_size_reads_units_as_written():
    """GB is 10^9 and GiB 2^30, as accelerate reads them; a bare number is refused with the fix."""
    assert parse_size("8GiB") == parse_size("8 gib") == parse_size("8G") == 8 * GiB
    assert parse_size("8GB") == parse_size("8 gb") == 8 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5T") == int(1.5 * 2**40)
    assert parse_size(8 * GiB) == 8 * GiB
    with pytest.raises(PluginError, match="'8GiB'.*'8GB'"):
        parse_size("8", "--gpu-memory")
    with pytest.raises(PluginError, match="8 bytes.*'8GiB'"):
        parse_size(8, "lowmem_gpu_memory")
    for bad in ("eight", "8 parsecs", "-1GB", "0GB", "nan"):
        with pytest.raises(PluginError, match="8GiB|positive"):
            parse_size(bad)


def test_presets_count_parameters_exactly_on_the_meta_device():
    shape = load_model_shape("llama2-7b")
    assert shape.params_total == 6_738_415_616  # Llama-2-7B
    assert shape.n_layers == 32 and shape.layer_params[0] == 202_383_360 and not shape.tied
    smol = load_model_shape("SmolLM2-135M")
    assert smol.params_total == 134_515_008 and smol.tied and smol.head_params == 0
    half = load_model_shape("llama2-7b", num_hidden_layers=16)
    assert half.params_total == 6_738_415_616 - 16 * 202_383_360
    with pytest.raises(PluginError, match="preset"):
        load_model_shape("no-such-model-anywhere")


def test_shape_from_config_json_folder_and_model(tmp_path):
    cfg = tiny_config("qwen2", num_hidden_layers=3)
    cfg.save_pretrained(tmp_path)
    by_folder = load_model_shape(str(tmp_path))
    by_file = load_model_shape(str(tmp_path / "config.json"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg)
    by_model = load_model_shape(model)
    n = sum(p.numel() for p in model.parameters())
    assert by_folder.params_total == by_file.params_total == by_model.params_total == n
    assert by_model.n_layers == 3 and by_model.llama_like and by_model.gated_mlp


# ---- activations: predicted == saved by autograd ----------------------------------------------------------
def _saved_bytes(precision: str, attn: str, n_kv: int, layers: int, B: int = 2, S: int = 32) -> int:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=n_kv,
                      num_hidden_layers=layers, vocab_size=256, max_position_embeddings=256)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            seen.setdefault(st._cdata, st.nbytes())
        return t

    ids = torch.randint(0, 256, (B, S))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(input_ids=ids, labels=ids)
    return sum(seen.values()), load_model_shape(model)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-mixed"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_layer_activations_equal_what_autograd_saves(precision, attn, n_kv):
    one, shape = _saved_bytes(precision, attn, n_kv, layers=1)
    three, _ = _saved_bytes(precision, attn, n_kv, layers=3)
    measured_per_layer = (three - one) / 2
    setup = TrainSetup(micro_batch=2, seq_len=32, precision=precision, attn_impl=attn, device="cpu")
    predicted = planner.layer_activation_bytes(shape, setup, setup.tokens)
    if setup.amp:  # autocast's bf16 copies of the weights are saved too; the planner counts them as weights
        predicted += 2 * shape.linear_layer_params
    assert predicted == pytest.approx(measured_per_layer, rel=0.01)


# ---- a whole step: predicted peak == CPU allocator peak ----------------------------------------------------
def _profile_peak(fn) -> int:
    """Peak of live bytes the CPU allocator reports while ``fn`` runs, relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def _state_bytes(model, optimizer) -> tuple[int, int, int]:
    seen, w, g = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        w += p.numel() * p.element_size()
        if p.grad is not None:
            g += p.grad.numel() * p.grad.element_size()
    storages, s = set(), 0
    for st in optimizer.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.dim() > 0 and t.untyped_storage()._cdata not in storages:
                storages.add(t.untyped_storage()._cdata)  # shared tensors (bitsandbytes' quantization maps) once
                s += t.untyped_storage().nbytes()
    return w, g, s


class _PeakOfStep:
    """A Trainer callback that profiles one optimizer step (the third: optimizer states exist by then)."""

    def __init__(self, step: int = 3):
        self.step, self.prof, self.baseline = step, None, None

    def callback(self, trainer):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == outer.step - 1:
                    from torch.profiler import ProfilerActivity, profile

                    w, _, s = _state_bytes(trainer.model, trainer.optimizer)
                    outer.baseline = w + s
                    outer.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    outer.prof.__enter__()

            def on_step_end(self, args, state, control, **kw):
                if outer.prof is not None and state.global_step == outer.step:
                    outer.prof.__exit__(None, None, None)
                    ev = sorted((e.start_ns(), e.nbytes()) for e in outer.prof.profiler.kineto_results.events()
                                if e.name() == "[memory]" and e.device_type().name == "CPU")
                    cur = peak = 0
                    for _, b in ev:
                        cur += b
                        peak = max(peak, cur)
                    outer.peak = outer.baseline + peak

        return CB()


def _tiny_for_peak(tied=False, **kw):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=tied)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, **kw)


@pytest.mark.parametrize("case", [
    dict(),
    dict(dtype="bf16"),
    dict(grad_accum=2),
    dict(tied=True),
    dict(offload=["gradient-checkpointing"]),
    dict(offload=["chunked-loss"]),
    dict(offload=["gradient-checkpointing", "chunked-loss"], grad_accum=2),
    dict(optimizer="adafactor"),
    dict(optimizer="bnb-adamw8bit", offload=["gradient-checkpointing"]),
])
def test_trainer_step_peak_matches_the_cpu_allocator(tmp_path, case):
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.plugins import get_plugin_host

    host = get_plugin_host()
    offload = [n for n in case.get("offload", []) if n in host.registry]
    optimizer = case.get("optimizer", "adamw")
    if len(offload) != len(case.get("offload", [])) or optimizer not in host.registry:
        pytest.skip(f"plugin(s) {case} not registered here")
    if host.registry[optimizer].missing_requirements():
        pytest.skip(f"{optimizer} needs {host.registry[optimizer].missing_requirements()}")
    bf16 = case.get("dtype") == "bf16"
    model = _tiny_for_peak(tied=case.get("tied", False), dtype=torch.bfloat16 if bf16 else torch.float32)
    G, seq, B = case.get("grad_accum", 1), 64, 2
    args = train_args(tmp_path, max_steps=3, per_device_train_batch_size=B, gradient_accumulation_steps=G,
                      lowmem_optimizer=optimizer, lowmem_offload=offload, logging_steps=10)
    probe = _PeakOfStep(step=3)
    trainer = LowMemTrainer(model=model, args=args, train_dataset=RandomTokens(n=64, seq=seq, vocab=512))
    trainer.add_callback(probe.callback(trainer))
    trainer.train()
    setup = planner.setup_from_args(args, seq, model)
    assert setup.device == "cpu" and setup.precision == ("bf16" if bf16 else "fp32")
    sel = trainer.lowmem_ctx.selection
    est = estimate_memory(PlanInput(load_model_shape(model), setup, {k: tuple(v) for k, v in sel.by_kind.items()},
                                    dict(sel.options)), host)
    assert est.gpu_peak_allocated == pytest.approx(probe.peak, rel=0.05), (est.peak_phase, est.gpu)

    # model state after the step, tensor by tensor: weights and states exactly; gradients are freed by then
    w, g, s = _state_bytes(trainer.model, trainer.optimizer)
    assert w == est.gpu["weights"] and s == est.gpu["optimizer states"] and g == 0


def test_state_bytes_equal_the_prediction_with_gradients_present():
    """After backward (before the step), every gradient exists: weights + gradients + states exactly."""
    model = _tiny_for_peak()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 512, (2, 64))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        if _ == 0:
            opt.step()
    shape = load_model_shape(model)
    setup = TrainSetup(micro_batch=2, seq_len=64, precision="fp32", device="cpu")
    st = planner.base_step(PlanInput(shape, setup, {"optimizer": ("adamw",)}))
    planner.adamw_states(PlanInput(shape, setup, {}), st)
    w, g, s = _state_bytes(model, opt)
    assert (w, g, s) == (st.weights, sum(st.grad_layer) + st.grad_embed + st.grad_head + st.grad_other, st.states)


def test_plain_loop_peak_with_autocast_and_checkpointing():
    """bf16 autocast (fp32 weights) and the Trainer's own gradient_checkpointing flag, in a plain loop."""
    for precision, gc in (("bf16-mixed", False), ("fp32", True), ("bf16-mixed", True)):
        model = _tiny_for_peak()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        ids = torch.randint(0, 512, (2, 64))

        def step():
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()
            with amp:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        w, _, s = _state_bytes(model, opt)
        measured = w + s + _profile_peak(step)
        setup = TrainSetup(micro_batch=2, seq_len=64, precision=precision, device="cpu", gradient_checkpointing=gc)
        est = estimate_memory(PlanInput(load_model_shape(model), setup, {"optimizer": ()}))
        assert est.gpu_peak_allocated == pytest.approx(measured, rel=0.05), (precision, gc, est.peak_phase)


# ---- the GPU measurements we have (shared/notes/measurements.md, stock Trainer, H200) --------------------------
@pytest.mark.parametrize("layers, optimizer, gc, measured_gib", [
    (32, "adamw", False, 86.4),  # bf16 weights + fused AdamW, micro-batch 4 x 2048
    (16, "adamw", False, 45.6),
    (32, "bnb-adamw8bit", True, 40.2),  # 8-bit AdamW (32-bit embedding states, as the Trainer does) + checkpointing
])
def test_prediction_matches_the_h200_measurements(layers, optimizer, gc, measured_gib):
    shape = load_model_shape("llama2-7b", num_hidden_layers=layers)
    setup = TrainSetup(micro_batch=4, seq_len=2048, precision="bf16", gradient_checkpointing=gc)
    est = estimate_memory(PlanInput(shape, setup, {"optimizer": (optimizer,)}))
    assert est.gpu_peak_allocated / GiB == pytest.approx(measured_gib, rel=0.05)


# bench/results/techniques.json (H200, 2026-11-29): 8 Llama-2-7B layers, pure bf16, micro-batch 4 x 2048, AdamW.
# The activation-offload run predates the cap on pending copies: it is predicted without the cap
# (max_pending_bytes=0), where every saved tensor stays on the GPU until its copy is done.
@pytest.mark.parametrize("offload, options, measured_gib", [
    ((), {}, 25.14),
    (("gradient-checkpointing",), {}, 15.43),
    (("gradient-checkpointing", "activation-offload"), {}, 15.68),
    (("activation-offload",), {"activation-offload": {"max_pending_bytes": 0}}, 24.22),
])
def test_prediction_matches_the_techniques_benchmark(host, offload, options, measured_gib):
    from hf_lowmem.context import resolve_selection

    shape = load_model_shape("llama2-7b", num_hidden_layers=8)
    setup = TrainSetup(micro_batch=4, seq_len=2048, precision="bf16")
    sel = resolve_selection(host, {"optimizer": ["adamw"], "offload": list(offload)}, options, "single")
    est = estimate_memory(PlanInput(shape, setup, {k: tuple(v) for k, v in sel.by_kind.items()}, dict(sel.options)), host)
    assert est.gpu_peak_allocated / GiB == pytest.approx(measured_gib, rel=0.05), est.peak_phase


def test_capped_pending_copies_bound_the_forward_of_activation_offload(host):
    """Without checkpointing, a forward saves faster than PCIe copies out: the cap decides the peak."""
    from hf_lowmem.context import resolve_selection

    shape = load_model_shape("llama2-7b", num_hidden_layers=8)
    setup = TrainSetup(micro_batch=4, seq_len=2048, precision="bf16")
    peaks = []
    for cap in (0, 4 << 30, 1 << 30):
        sel = resolve_selection(host, {"offload": ["activation-offload"]},
                                {"activation-offload": {"max_pending_bytes": cap}}, "single")
        inp = PlanInput(shape, setup, {k: tuple(v) for k, v in sel.by_kind.items()}, dict(sel.options))
        peaks.append(estimate_memory(inp, host).gpu_peak_allocated)
    assert peaks[0] > peaks[1] > peaks[2]


# ---- planning ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def host():
    from hf_lowmem.plugins import load_plugins

    return load_plugins()


def test_a_big_budget_gets_the_fastest_lossless_plan(host):
    shape = load_model_shape("smollm2-135m")
    setup = TrainSetup(micro_batch=4, seq_len=1024)
    plan = plan_training(shape, setup, parse_size("80GiB"), parse_size("64GiB"), host=host, check_installed=False)
    assert plan.ok and plan.chosen.lossless
    assert not any("checkpointing" in n or n == "stream" for n in plan.chosen.inp.names())  # nothing to trade
    assert plan.chosen.estimate.speed > 0.95


def test_a_tight_budget_trades_speed_for_memory_and_fits(host):
    shape = load_model_shape("smollm2-135m")
    setup = TrainSetup(micro_batch=8, seq_len=2048)
    roomy = plan_training(shape, setup, parse_size("80GiB"), parse_size("64GiB"), host=host, check_installed=False)
    tight = plan_training(shape, setup, parse_size("6GiB"), parse_size("64GiB"), host=host, check_installed=False)
    assert tight.ok and tight.chosen.estimate.gpu_total <= parse_size("6GiB")
    assert tight.chosen.estimate.speed <= roomy.chosen.estimate.speed
    assert roomy.chosen.estimate.gpu_total > parse_size("6GiB")
    # every faster alternative was rejected for a stated reason
    for c in tight.rejected():
        assert c.why_not(tight.gpu_budget, tight.host_budget)


def test_7b_in_8gb_needs_the_streaming_engine(host):
    if "stream" not in host.registry:
        pytest.skip("the stream plugin is not registered")
    shape = load_model_shape("llama2-7b")
    setup = TrainSetup(micro_batch=4, seq_len=2048, grad_accum=8)
    plan = plan_training(shape, setup, parse_size("8GiB"), parse_size("64GiB"), host=host, check_installed=False)
    assert plan.ok and "stream" in plan.chosen.inp.names()
    e = plan.chosen.estimate
    assert e.gpu_total <= 8 * GiB and e.host_total <= 64 * GiB
    assert "activation stash (pinned)" in e.host


def test_7b_plans_at_8gb_gpu_with_32gb_and_64gb_of_ram(host):
    """The machine people own: 8 GiB of GPU and 32 GiB of RAM fit only the compact host tier (measured at 7B with
    stash_every 2: 29.29-29.43 GiB of host memory for the whole process tree, 6.66-7.40 GiB of GPU,
    bench/results/stream_7b_tiers.json, stream_7b_tiers_alone.json); with 64 GiB the compact tier stashing every
    layer, the fastest plan (measured 7,729 tokens/s at 37.89 GiB, bench/results/stream_multigpu_7b.json), whose
    measured quality gap (+0.09%, three seeds) is also below the exact tier's with 8-bit AdamW, which fits too."""
    if "stream" not in host.registry:
        pytest.skip("the stream plugin is not registered")
    shape = load_model_shape("llama2-7b")
    setup = TrainSetup(micro_batch=4, seq_len=2048, grad_accum=8)
    small = plan_training(shape, setup, parse_size("8GiB"), parse_size("32GiB"), host=host, check_installed=False)
    assert small.ok and small.chosen.inp.names()[0] == "stream"
    opts = small.chosen.inp.options["stream"]
    assert opts.tier == "compact" and opts.stash_every == 2
    e = small.chosen.estimate
    assert 29.29 * GiB <= e.host_total <= 32 * GiB and e.gpu_total <= 8 * GiB
    assert small.chosen.quality_gap == host.registry["stream"].COMPACT_GAP_PCT
    big = plan_training(shape, setup, parse_size("8GiB"), parse_size("64GiB"), host=host, check_installed=False)
    best = big.chosen
    assert best.inp.options["stream"].tier == "compact" and 32 * GiB < best.estimate.host_total <= 64 * GiB
    exact = [c for c in big.candidates if c.fits and c.inp.options.get("stream") is not None
             and c.inp.options["stream"].tier == "exact"]
    assert exact and all(c.estimate.speed <= best.estimate.speed and c.quality_gap > best.quality_gap for c in exact)


def test_no_plan_fits_names_the_smallest_budget_and_that_budget_works(host):
    shape = load_model_shape("llama2-7b")
    setup = TrainSetup(micro_batch=4, seq_len=2048)
    plan = plan_training(shape, setup, parse_size("2GiB"), parse_size("64GiB"), host=host, check_installed=False)
    assert not plan.ok
    err = plan.budget_error()
    assert isinstance(err, MemoryBudgetError) and "smallest budget that works" in str(err)
    need = planner.size_arg(plan.smallest.estimate.gpu_total)
    assert f'lowmem_gpu_memory="{need}"' in str(err)
    again = plan_training(shape, setup, parse_size(need), parse_size("64GiB"), host=host, check_installed=False)
    assert again.ok


def test_a_plugin_can_bring_its_own_memory_model():
    from hf_lowmem import Plugin, hookimpl
    from hf_lowmem.plugins import load_plugins

    class ZeroStateSGD(Plugin):
        """A third-party optimizer with no states at all, and its memory model."""

        name, kind, lossless = "zero-state-sgd", "optimizer", False

        def memory_model(self, plan, step):
            step.states = 0
            step.notes.append("zero-state-sgd keeps no state")

    class Tiny:
        @hookimpl
        def hf_lowmem_register(self, register):
            register(ZeroStateSGD())

    class NoModel:
        @hookimpl
        def hf_lowmem_register(self, register):
            register(Plugin(name="mystery-opt", kind="optimizer"))

    h = load_plugins(extra_plugins=[("tiny", Tiny()), ("nomodel", NoModel())])
    assert not h.failures, [str(f) for f in h.failures]
    shape = load_model_shape("smollm2-135m")
    setup = TrainSetup(micro_batch=1, seq_len=512)
    est = estimate_memory(PlanInput(shape, setup, {"optimizer": ("zero-state-sgd",)}), h)
    adamw = estimate_memory(PlanInput(shape, setup, {"optimizer": ("adamw",)}), h)
    assert est.gpu.get("optimizer states", 0) == 0 and "zero-state-sgd keeps no state" in est.notes
    assert adamw.gpu["optimizer states"] == 2 * 4 * shape.params_total
    assert est.gpu_peak_allocated < adamw.gpu_peak_allocated
    plan = plan_training(shape, setup, parse_size("80GiB"), parse_size("64GiB"), host=h, check_installed=False)
    names = {n for c in plan.candidates for n in c.inp.names()}
    assert "zero-state-sgd" in names and "mystery-opt" not in names  # no memory model: never picked on its own
    unknown = estimate_memory(PlanInput(shape, setup, {"optimizer": ("mystery-opt",)}), h)
    assert "plugin 'mystery-opt' has no memory model: its effect is not counted" in unknown.notes
    # chosen by the user, it is still planned, and the plan says what is not counted
    required = plan_training(shape, setup, parse_size("80GiB"), parse_size("64GiB"), host=h, check_installed=False,
                             require={"optimizer": ["mystery-opt"]})
    assert required.ok and required.chosen.inp.selected("optimizer") == "mystery-opt"
    assert any("'mystery-opt' has no memory model" in n for n in required.chosen.estimate.notes)


# ---- the arguments and the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def gpu_run(monkeypatch):
    """Plan these CPU runs as a GPU run would be planned (a CPU-only run refuses lowmem_gpu_memory)."""
    monkeypatch.setattr("hf_lowmem.planner.arguments.training_device", lambda args: "cuda")


def test_lowmem_gpu_memory_selects_the_plan_and_training_runs(tmp_path, gpu_run):
    from hf_lowmem import LowMemTrainer
    from tests.tiny import tiny_model

    model = tiny_model()
    shape = load_model_shape(model)
    setup = TrainSetup(micro_batch=2, seq_len=16, precision="fp32", attn_impl="eager", device="cuda")
    plain = estimate_memory(PlanInput(shape, setup, {"optimizer": ("adamw",)}))
    # a budget below the plain run's need (on a GPU, the CUDA context and framework overhead dwarf a tiny
    # model's tensors): the planner must add memory savers
    budget = plain.gpu_total - 1
    args = train_args(tmp_path, lowmem_gpu_memory=f"{budget}B", lowmem_host_memory="64GiB")
    trainer = LowMemTrainer(model=model, args=args, train_dataset=RandomTokens(seq=16))
    chosen = trainer.lowmem_ctx.selection.names()
    assert chosen and chosen != ["adamw"], chosen
    assert trainer.lowmem_ctx.plan.chosen.estimate.gpu_total <= budget
    trainer.train()
    assert trainer.state.global_step == 4


def test_an_impossible_budget_fails_before_any_plugin_touches_the_model(tmp_path, monkeypatch, gpu_run):
    from hf_lowmem import LowMemTrainer
    from hf_lowmem.plugins import PluginHost
    from tests.tiny import tiny_model

    touched = []
    monkeypatch.setattr(PluginHost, "prepare_model", lambda self, **kw: touched.append(1) or kw["model"])
    args = train_args(tmp_path, lowmem_gpu_memory="2KB", lowmem_host_memory="64GiB", lowmem_optimizer="adamw")
    with pytest.raises(MemoryBudgetError, match=r"smallest budget that works is .*lowmem_gpu_memory=") as e:
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens(seq=16))
    assert "with your selection" in str(e.value) and not touched


def test_bad_budget_strings_fail_at_construction(tmp_path):
    with pytest.raises(PluginError, match="lowmem_gpu_memory"):
        train_args(tmp_path, lowmem_gpu_memory="lots")


def test_train_cli_refuses_before_loading_weights(tmp_path, monkeypatch, gpu_run):
    import hf_lowmem.cli_train as cli_train

    cfg = tiny_config("llama")
    cfg.save_pretrained(tmp_path / "m")
    (tmp_path / "data.txt").write_text("hello world " * 200)

    def no_loading(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(cli_train, "build_model", no_loading)
    with pytest.raises(SystemExit) as e:
        cli_train.run_argv(["--model", str(tmp_path / "m" / "config.json"), "--data", str(tmp_path / "data.txt"),
                            "--output_dir", str(tmp_path / "out"), "--block_size", "32", "--use_cpu", "--report_to",
                            "none", "--lowmem_gpu_memory", "1KB", "--lowmem_host_memory", "8GiB"])
    assert "smallest budget that works" in str(e.value.code)


def _cli(capsys, *argv):
    from hf_lowmem.cli import main

    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_table_and_json(tmp_path, capsys):
    code, out, err = _cli(capsys, "--model", "llama2-7b", "--gpu-memory", "8GiB", "--host-memory", "64GiB", "--seq-len",
                          "2048", "--batch-size", "4", "--grad-accum", "8", "--assume-installed")
    assert code == 0, err
    for word in ("PLAN:", "weights", "optimizer states", "activations", "framework overhead", "CUDA context",
                 "Host memory", "Rejected alternatives", "why not", "speed"):
        assert word in out, word
    tiny_cfg = tmp_path / "config.json"
    tiny_config("llama").to_json_file(tiny_cfg)
    code, out, err = _cli(capsys, "--model", str(tiny_cfg), "--gpu-memory", "1GiB", "--host-memory", "8GiB", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["chosen"]["fits"] and data["chosen"]["gpu_total_gib"] <= 1.0
    assert set(data["chosen"]["gpu_gib"]) >= {"weights", "optimizer states", "activations"}
    code, out, err = _cli(capsys, "--model", "llama2-13b", "--gpu-memory", "1GiB", "--host-memory", "8GiB", "--json")
    assert code == 2 and "smallest" in json.loads(out)["error"]
    code, out, err = _cli(capsys, "--model", "no-such-preset", "--gpu-memory", "1GiB")
    assert code == 1 and "preset" in err
