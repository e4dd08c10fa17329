"""The user's path through the stream engine (issue 12), on tiny models: a bf16 checkpoint loaded with
``from_pretrained`` -> training with ``save_steps`` -> ``resume_from_checkpoint`` with the losses of the
uninterrupted run -> ``save_model`` / ``hf-lowmem export --format hf`` writing a bf16 folder a plain
``from_pretrained`` loads; and TRL's defaults (``bf16`` with ``gradient_checkpointing``)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_lowmem.engine.weights_io as wio
from hf_lowmem import LowMemTrainer
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


@pytest.fixture
def bf16_folder(tmp_path):
    """A tiny Llama saved the way hub checkpoints are: bf16 safetensors."""
    folder = tmp_path / "base"
    tiny_model(hidden_size=64, intermediate_size=128).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _trainer(folder, out, tier, **kw):
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    base = dict(max_steps=6, gradient_accumulation_steps=2, learning_rate=1e-2, save_strategy="steps", save_steps=3,
                lowmem_offload=["stream"], lowmem_options={"stream": {"tier": tier}})
    base.update(kw)
    return LowMemTrainer(model=model, args=train_args(out, **base), train_dataset=RandomTokens())


@pytest.mark.parametrize("tier", ["exact", "compact"])
def test_bf16_checkpoint_to_trained_model(tmp_path, bf16_folder, tier, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(wio, "SHARD_BYTES", 64 * 1024)  # several shards even for a tiny model
    out = tmp_path / "run"
    full = _trainer(bf16_folder, out, tier)
    eng = full.lowmem_engine
    assert {p.dtype for p in full.model.parameters()} == {torch.float32 if tier == "exact" else torch.bfloat16}
    full.train()
    ckpt = out / "checkpoint-3"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    from safetensors import safe_open

    shard = next(iter(set(index["weight_map"].values())))
    with safe_open(str(ckpt / shard), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # weights as the model came: bf16
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert ("master" in opt["blocks"][1]) == (tier == "exact")  # fp32 masters travel with the optimizer state
    # resume in a new trainer from the same bf16 base: the losses of the uninterrupted run
    again = _trainer(bf16_folder, out, tier)
    again.train(resume_from_checkpoint=str(ckpt))
    assert logged_losses(again)[3:] == logged_losses(full)[3:]
    eng.flush()
    again.lowmem_engine.flush()
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), again.model.parameters()))
    # save_model: a bf16 folder a plain from_pretrained reads, with the trained weights
    final = tmp_path / "final"
    again.save_model(str(final))
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.bfloat16
    for (name, p), q in zip(again.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name
    # hf-lowmem export --format hf of that folder keeps bf16
    from hf_lowmem.export import export_model

    res = export_model(str(final), str(tmp_path / "export"), "hf")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").dtype == torch.bfloat16, res.summary()


def test_tied_embeddings_are_saved_once_and_reload_tied(tmp_path):
    t = LowMemTrainer(model=tiny_model(tie_word_embeddings=True),
                      args=train_args(tmp_path, max_steps=2, lowmem_offload=["stream"]), train_dataset=RandomTokens())
    t.train()
    t.save_model(str(tmp_path / "final"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, t.model(ids).logits, atol=1e-5)


def test_bf16_with_gradient_checkpointing_trains_and_says_so_once(tmp_path, caplog):
    """TRL's SFTConfig sets both; the engine recomputes layers itself, switches the model's checkpointing off and
    logs it once (before: CheckpointError, bf16 saved vs fp32 recomputed metadata, at the first step)."""
    kw = dict(max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2, bf16=True, lowmem_offload=["stream"])
    with caplog.at_level(logging.WARNING, logger="hf_lowmem"):
        t = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path / "gc", gradient_checkpointing=True, **kw),
                          train_dataset=RandomTokens())
        t.train()
    said = [r for r in caplog.records if "gradient checkpointing is switched off" in r.getMessage()]
    assert len(said) == 1
    assert not any(getattr(m, "gradient_checkpointing", False) for m in t.model.modules())
    ref = LowMemTrainer(model=tiny_model(), args=train_args(tmp_path / "ref", **kw), train_dataset=RandomTokens())
    ref.train()
    assert logged_losses(t) == logged_losses(ref)
