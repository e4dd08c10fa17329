"""The weight-streaming engine (issue 4) on tiny models: its losses and updated weights equal a plain
Trainer's with the same optimizer (fp32: within 1e-5), with and without gradient accumulation, with
clipping, an LR schedule, tied embeddings, padding, and across save/resume. The same code path runs on
the GPU (the GPU test at the end)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_lowmem import LowMemTrainer
from hf_lowmem.errors import MemoryBudgetError, PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args

TOL = 1e-5


def _pair(tmp_path, model_type="llama", model_kw=None, dataset=None, **kw):
    """(stream trainer, plain trainer), trained the same way from the same initial weights."""
    model_kw = model_kw or {}
    dataset = dataset or RandomTokens()
    s = LowMemTrainer(model=tiny_model(model_type, **model_kw), args=train_args(tmp_path / "s", lowmem_offload=["stream"], **kw),
                      train_dataset=dataset)
    s.train()
    p = Trainer(model=tiny_model(model_type, **model_kw), args=train_args(tmp_path / "p", **kw), train_dataset=dataset)
    p.train()
    s.lowmem_engine.flush()
    return s, p


def _max_weight_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("model_type,ga", [("llama", 1), ("llama", 4), ("mistral", 3), ("qwen2", 2)])
def test_losses_and_weights_equal_plain_trainer(tmp_path, model_type, ga):
    s, p = _pair(tmp_path, model_type, gradient_accumulation_steps=ga, max_steps=4, learning_rate=1e-2,
                 weight_decay=0.1, max_grad_norm=1.0)
    ls, lp = logged_losses(s), logged_losses(p)
    assert len(ls) == len(lp) == 4
    assert max(abs(a - b) for a, b in zip(ls, lp)) < TOL
    gs = [h["grad_norm"] for h in s.state.log_history if "grad_norm" in h]
    gp = [h["grad_norm"] for h in p.state.log_history if "grad_norm" in h]
    assert max(abs(a - b) for a, b in zip(gs, gp)) < TOL
    assert _max_weight_diff(s, p) < TOL
    # the weights really moved (the comparison is not between two untouched models)
    assert max((a - b).abs().max().item() for a, b in zip(s.model.parameters(), tiny_model(model_type).parameters())) > 1e-3


def test_clipping_actually_clips(tmp_path):
    s, p = _pair(tmp_path, max_steps=3, learning_rate=1e-2, max_grad_norm=0.05)
    assert max(h["grad_norm"] for h in s.state.log_history if "grad_norm" in h) > 0.05  # so clipping was active
    assert _max_weight_diff(s, p) < TOL


def test_tied_embeddings_schedule_eval_and_resume(tmp_path):
    kw = dict(max_steps=6, gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=3,
              lr_scheduler_type="cosine", warmup_steps=2)
    mk = dict(tie_word_embeddings=True)
    s, p = _pair(tmp_path, model_kw=mk, **kw)
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert s.model.lm_head.weight is s.model.model.embed_tokens.weight
    assert _max_weight_diff(s, p) < TOL
    ev = RandomTokens(n=8, seed=5)
    assert abs(s.evaluate(ev)["eval_loss"] - p.evaluate(ev)["eval_loss"]) < TOL
    # resume from the step-3 checkpoint: the same losses as the uninterrupted run, optimizer state included
    r = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "s", lowmem_offload=["stream"], **kw),
                      train_dataset=RandomTokens())
    r.train(resume_from_checkpoint=str(tmp_path / "s" / "checkpoint-3"))
    assert max(abs(a - b) for a, b in zip(logged_losses(r)[3:], logged_losses(s)[3:])) < TOL
    r.lowmem_engine.flush()
    assert _max_weight_diff(r, s) < TOL


class _Padded(torch.utils.data.Dataset):
    """Variable-length examples padded to 16, with attention masks and -100 labels on the padding."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        n = 6 + i % 10
        ids = torch.zeros(16, dtype=torch.long)
        ids[:n] = torch.randint(1, 128, (n,), generator=g)
        mask = torch.zeros(16, dtype=torch.long)
        mask[:n] = 1
        labels = ids.clone()
        labels[n:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_padding_and_masks(tmp_path):
    s, p = _pair(tmp_path, dataset=_Padded(), gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2)
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert _max_weight_diff(s, p) < TOL


def test_8bit_states_train_and_stay_close(tmp_path):
    pytest.importorskip("bitsandbytes")
    kw = dict(max_steps=5, gradient_accumulation_steps=2, learning_rate=1e-2)
    mk = dict(hidden_size=64, intermediate_size=128)
    e8 = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "a", lowmem_offload=["stream"],
                       lowmem_options={"stream": {"states": "8bit"}}, **kw), train_dataset=RandomTokens())
    e8.train()
    opt = e8.lowmem_engine.optimizer
    assert opt.state_format == "8bit"
    big = e8.model.model.layers[0].mlp.up_proj.weight
    assert opt.state[big]["state1"].dtype == torch.uint8  # 1 byte per value per state
    e32 = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "b", lowmem_offload=["stream"], **kw),
                        train_dataset=RandomTokens())
    e32.train()
    l8, l32 = logged_losses(e8), logged_losses(e32)
    assert max(abs(a - b) for a, b in zip(l8, l32)) < 0.05
    assert l8 != l32  # the 8-bit states are really in use


class _OtherOptimizer:
    """A third-party optimizer plugin the engine cannot run."""

    @staticmethod
    def hf_lowmem_register(register):
        from hf_lowmem.registry import PluginInfo

        register(PluginInfo(name="other-opt", kind="optimizer"))


def test_unsupported_combinations_fail_at_construction(tmp_path, monkeypatch):
    import hf_lowmem.plugins as hp

    with pytest.raises(PluginError, match="gradient-checkpointing"):
        train_args(tmp_path, lowmem_offload=["stream", "gradient-checkpointing"])
    monkeypatch.setattr(hp, "_default_host", hp.load_plugins(extra_plugins=[("other", _OtherOptimizer)]))
    with pytest.raises(PluginError, match="supports adamw, bnb-adamw8bit; 'other-opt' is not one of them"):
        train_args(tmp_path, lowmem_offload=["stream"], lowmem_optimizer="other-opt")
    with pytest.raises(PluginError, match="no option"):
        train_args(tmp_path, lowmem_offload=["stream"], lowmem_options={"stream": {"state": "8bit"}})


def test_dropout_is_refused(tmp_path):
    with pytest.raises(PluginError, match="dropout"):
        LowMemTrainer(model=tiny_model(attention_dropout=0.1), args=train_args(tmp_path, lowmem_offload=["stream"]),
                      train_dataset=RandomTokens())


def test_host_budget_refused_with_both_numbers(tmp_path):
    args = train_args(tmp_path, lowmem_offload=["stream"], lowmem_host_memory="64KB")
    with pytest.raises(MemoryBudgetError, match=r"needs .* GiB of host memory in all: .* GiB more \(.*\) on top of "
                                                 r"the .* GiB this process tree uses, but the declared host budget is "
                                                 r"0.0 GiB\. Use the compact tier"):
        LowMemTrainer(model=tiny_model(), args=args, train_dataset=RandomTokens())


def test_available_memory_checked_when_no_budget_is_declared(tmp_path, monkeypatch):
    import hf_lowmem.engine.hostmem as hm

    monkeypatch.setattr(hm, "available_bytes", lambda: 1024)
    with pytest.raises(MemoryBudgetError, match=r"needs .* GiB more host memory \(fp32 optimizer states .*\), but the "
                                                 r"memory available now is 0.0 GiB"):
        LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_offload=["stream"]), train_dataset=RandomTokens())


def test_model_stays_on_host_and_saves_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    s = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_offload=["stream"], max_steps=2),
                      train_dataset=RandomTokens())
    s.train()
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in s.model.parameters())
    s.save_model(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, s.model(ids).logits, atol=1e-5)


@pytest.mark.gpu
def test_gpu_fp32_equals_plain_trainer(tmp_path):
    kw = dict(use_cpu=False, max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2)
    s = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path / "s", lowmem_offload=["stream"], **kw),
                      train_dataset=RandomTokens())
    s.train()
    p = Trainer(model=tiny_model(), args=train_args(tmp_path / "p", **kw), train_dataset=RandomTokens())
    p.train()
    s.lowmem_engine.flush()
    # TF32 and kernel choices differ between a whole-model and a per-layer run on the GPU
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < 1e-4
    assert max((x.cpu() - y.cpu()).abs().max().item() for x, y in zip(s.model.parameters(), p.model.parameters())) < 1e-4


def test_composes_with_attention_and_chunked_loss_plugins(tmp_path):
    """The engine runs the model's own layers, so an attention plugin's implementation is what it computes
    with; chunked-loss is refused as redundant (the engine always computes its loss in chunks:
    tests/test_chunked_loss.py)."""
    kw = dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2)
    s = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path / "s", lowmem_offload=["stream"],
                      lowmem_attention="sdpa", **kw), train_dataset=RandomTokens())
    assert s.model.config._attn_implementation == "sdpa"
    s.train()
    ref = tiny_model()
    ref.config._attn_implementation = "sdpa"
    p = Trainer(model=ref, args=train_args(tmp_path / "p", **kw), train_dataset=RandomTokens())
    p.train()
    s.lowmem_engine.flush()
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert _max_weight_diff(s, p) < TOL


# ---- bad input and faults (issue 11) -------------------------------------------------------------------------
def test_resume_with_8bit_states_continues_exactly_and_keeps_uint8(tmp_path):
    pytest.importorskip("bitsandbytes")
    kw = dict(max_steps=6, gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=3,
              lowmem_optimizer="bnb-adamw8bit", lowmem_offload=["stream"])
    mk = dict(hidden_size=64, intermediate_size=128)
    s = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path, **kw), train_dataset=RandomTokens())
    s.train()
    r = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path, **kw), train_dataset=RandomTokens())
    r.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert max(abs(a - b) for a, b in zip(logged_losses(r)[3:], logged_losses(s)[3:])) < TOL
    big = r.model.model.layers[0].mlp.up_proj.weight
    assert r.lowmem_engine.optimizer.state[big]["state1"].dtype == torch.uint8


def test_resume_with_other_state_format_is_refused_in_one_line(tmp_path):
    pytest.importorskip("bitsandbytes")
    kw = dict(max_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=2, lowmem_offload=["stream"])
    mk = dict(hidden_size=64, intermediate_size=128)
    LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path, **kw), train_dataset=RandomTokens()).train()
    r = LowMemTrainer(model=tiny_model(**mk), args=train_args(tmp_path / "r", lowmem_options={"stream": {"states": "8bit"}},
                      **{**kw, "max_steps": 4}), train_dataset=RandomTokens())
    with pytest.raises(PluginError, match="resume with"):
        r.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


class _MaskSome:
    """A collator that masks every label of the micro-batches it is told to (counted in calls)."""

    def __init__(self, masked):
        self.calls, self.masked = 0, set(masked)

    def __call__(self, features):
        from transformers import default_data_collator

        batch = default_data_collator(features)
        if self.calls in self.masked:
            batch["labels"][:] = -100
        self.calls += 1
        return batch


@pytest.mark.parametrize("ga,masked", [(1, {2}), (2, {2, 3}), (2, {2})], ids=["step", "window", "one-micro-batch"])
def test_fully_masked_batches_train_on_like_a_plain_trainer(tmp_path, ga, masked):
    kw = dict(max_steps=4, gradient_accumulation_steps=ga, learning_rate=1e-2, max_grad_norm=1.0)
    s = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path / "s", lowmem_offload=["stream"], **kw),
                      train_dataset=RandomTokens(), data_collator=_MaskSome(masked))
    s.train()
    p = Trainer(model=tiny_model(), args=train_args(tmp_path / "p", **kw), train_dataset=RandomTokens(),
                data_collator=_MaskSome(masked))
    p.train()
    ls, lp = logged_losses(s), logged_losses(p)
    assert max(abs(a - b) for a, b in zip(ls, lp)) < TOL
    if ga == 1 or len(masked) == 2:
        assert 0.0 in ls  # the masked window really happened
    s.lowmem_engine.flush()
    assert _max_weight_diff(s, p) < TOL


@pytest.mark.parametrize("opts,match", [
    ({"host_memory": "abc"}, "cannot read 'abc' as a size"),
    ({"host_memory": "-1"}, "host_memory must be positive"),
    ({"gpu_memory": "8"}, "has no unit"),
    ({"check_memory": "no"}, "check_memory must be true or false"),
    ({"loss_chunk_tokens": "many"}, "loss_chunk_tokens must be an integer"),
])
def test_bad_stream_options_fail_in_one_line_at_construction(tmp_path, opts, match):
    with pytest.raises(PluginError, match=match) as e:
        train_args(tmp_path, lowmem_offload=["stream"], lowmem_options={"stream": opts})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("lr", [-1.0, float("nan"), float("inf")])
def test_bad_learning_rate_is_refused_before_training(tmp_path, lr):
    with pytest.raises(PluginError, match=r"learning_rate=.* cannot train: it must be a finite number >= 0"):
        LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_offload=["stream"], learning_rate=lr),
                      train_dataset=RandomTokens())


def test_gemma_scaled_embeddings_train_like_a_plain_trainer(tmp_path):
    s, p = _pair(tmp_path, "gemma", model_kw=dict(head_dim=8), max_steps=3, gradient_accumulation_steps=2,
                 learning_rate=1e-2)
    assert max(abs(a - b) for a, b in zip(logged_losses(s), logged_losses(p))) < TOL
    assert _max_weight_diff(s, p) < TOL
