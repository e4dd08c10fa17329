"""chunked-loss under mixed precision: the decoder computes in the autocast dtype, as in plain training.

The Trainer (through accelerate) wraps ``model.forward`` in ``torch.autocast`` for ``bf16=True``; chunked-loss
calls the decoder directly, so it must enter that region itself. It did not: on the H200, planner row r2
(SmolLM2-135M, fp32 weights, bf16=True, seq 4096, checkpointing + chunked-loss) ran its whole decoder in fp32,
and its grouped-query attention went to SDPA's math kernel (no fused CUDA kernel takes fp32 with grouped KV
heads): 6.83 GiB measured against 2.87 GiB predicted. On the CPU the same bug shows as fp32 projections and
losses that differ from the plain Trainer's.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_lowmem import LowMemTrainer
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


def _model():
    m = tiny_model(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)
    m.config._attn_implementation = "sdpa"
    return m


def _run(tmp_path, offload, bf16):
    """Losses of 4 steps, and the dtypes every decoder projection produced while training (recompute included)."""
    model = _model()
    seen: set = set()

    def hook(mod, args, out):
        if mod.training:
            seen.add(out.dtype)

    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.register_forward_hook(hook)
    kw = dict(max_steps=4, bf16=bf16, learning_rate=1e-3)
    if offload is None:
        trainer = Trainer(model=model, args=train_args(tmp_path, **kw), train_dataset=RandomTokens())
    else:
        trainer = LowMemTrainer(model=model, args=train_args(tmp_path, lowmem_offload=offload, **kw),
                                train_dataset=RandomTokens())
    trainer.train()
    return logged_losses(trainer), seen


@pytest.mark.parametrize("offload", [["chunked-loss"], ["gradient-checkpointing", "chunked-loss"]])
def test_bf16_mixed_decoder_runs_in_bf16_and_losses_equal_plain(tmp_path, offload):
    plain, plain_dtypes = _run(tmp_path / "plain", None, bf16=True)
    got, dtypes = _run(tmp_path / "chunked", offload, bf16=True)
    assert plain_dtypes == {torch.bfloat16}  # what the Trainer's autocast does to the model's own forward
    assert dtypes == {torch.bfloat16}, dtypes  # was {torch.float32}: the decoder ran outside autocast
    assert len(got) == len(plain) == 4
    # same arithmetic: with the decoder in fp32 these differed by ~4e-4
    assert max(abs(a - b) for a, b in zip(got, plain)) < 1e-5, (got, plain)


def test_full_precision_is_left_alone(tmp_path):
    plain, _ = _run(tmp_path / "plain", None, bf16=False)
    got, dtypes = _run(tmp_path / "chunked", ["chunked-loss"], bf16=False)
    assert dtypes == {torch.float32}
    assert max(abs(a - b) for a, b in zip(got, plain)) < 1e-5


def test_mixed_precision_dtype_follows_the_arguments(tmp_path):
    from hf_lowmem_plugins.chunked_loss import mixed_precision_dtype

    assert mixed_precision_dtype(train_args(tmp_path, bf16=True)) is torch.bfloat16
    assert mixed_precision_dtype(train_args(tmp_path)) is None
