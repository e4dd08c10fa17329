"""Attention plugins: sdpa / auto-attention / flash-attn set the instance's implementation; errors."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_lowmem import LowMemTrainer, MissingExtraError, PluginError
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


def run(tmp_path, model=None, **kw):
    model = model if model is not None else tiny_model()
    trainer = LowMemTrainer(model=model, args=train_args(tmp_path, **kw), train_dataset=RandomTokens())
    trainer.train()
    return logged_losses(trainer), trainer


@pytest.mark.parametrize("name", ["sdpa", "auto-attention"])
def test_sdpa_sets_instance_implementation_and_matches_eager(tmp_path, name):
    eager, _ = run(tmp_path / "eager")
    other = tiny_model()
    losses, trainer = run(tmp_path, lowmem_attention=name)
    assert trainer.model.config._attn_implementation == "sdpa"
    assert other.config._attn_implementation == "eager"  # another instance is untouched
    assert losses == pytest.approx(eager, rel=1e-5)
    assert trainer.lowmem_ctx.state[name]["implementation"] == "sdpa"


def test_sdpa_options_are_checked(tmp_path):
    with pytest.raises(PluginError, match="require_fused"):
        train_args(tmp_path, lowmem_attention="sdpa", lowmem_options={"sdpa": {"fused": True}})


def test_flash_attn_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # make it fail to import even where installed
    with pytest.raises(MissingExtraError, match=r"hf-lowmem\[flash-attn\]"):
        LowMemTrainer(model=tiny_model(), args=train_args(tmp_path, lowmem_attention="flash-attn"),
                      train_dataset=RandomTokens())


def test_auto_attention_falls_back_without_flash_attn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    _, trainer = run(tmp_path, max_steps=1, lowmem_attention="auto-attention")
    assert trainer.model.config._attn_implementation == "sdpa"


def test_sdpa_composes_with_chunked_loss_and_checkpointing(tmp_path):
    ref, _ = run(tmp_path / "ref", lowmem_attention="sdpa")
    losses, trainer = run(tmp_path, lowmem_attention="sdpa", lowmem_offload=["gradient-checkpointing", "chunked-loss"])
    assert losses == pytest.approx(ref, rel=1e-5)


@pytest.mark.gpu
def test_fused_sdpa_kernel_runs_on_gpu():
    from hf_lowmem_plugins.attention import fused_sdpa_backends

    assert fused_sdpa_backends(torch.bfloat16, 128)  # flash and/or efficient run fwd+bwd at Llama's head size


@pytest.mark.gpu
def test_sdpa_plugin_checks_kernel_on_gpu(tmp_path):
    model = tiny_model(hidden_size=256, num_attention_heads=2, num_key_value_heads=2).to(torch.bfloat16)
    losses, trainer = run(tmp_path, model=model, use_cpu=False, max_steps=2, lowmem_attention="sdpa",
                          lowmem_options={"sdpa": {"enforce": True}})
    state = trainer.lowmem_ctx.state["sdpa"]
    assert state["checked"] and state["backends"]
    assert all(l == l for l in losses)  # finite


@pytest.mark.gpu
def test_flash_attn_on_gpu(tmp_path):
    pytest.importorskip("flash_attn")
    model = tiny_model(hidden_size=256, num_attention_heads=2, num_key_value_heads=2).to(torch.bfloat16)
    _, trainer = run(tmp_path, model=model, use_cpu=False, max_steps=2, lowmem_attention="flash-attn")
    assert trainer.model.config._attn_implementation == "flash_attention_2"
