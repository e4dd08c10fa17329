"""int8-weights resumes exactly: its stochastic-rounding generator is saved in checkpoints
(hf_lowmem.checkpoint.register_rng), so a run resumed from a checkpoint has the losses and weights of an
uninterrupted one."""

from __future__ import annotations

import shutil

import torch

from hf_lowmem import LowMemTrainer
from tests.tiny import RandomTokens, logged_losses, tiny_model, train_args


def _run(out, max_steps, resume=None):
    trainer = LowMemTrainer(model=tiny_model(), train_dataset=RandomTokens(), args=train_args(
        out, max_steps=max_steps, save_strategy="steps", save_steps=2, learning_rate=1e-2,
        lowmem_quantization="int8-weights", lowmem_options={"int8-weights": {"block_size": 16}}))
    trainer.train(resume_from_checkpoint=resume)
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    return dict(zip(steps, logged_losses(trainer))), trainer


def _weights(trainer):
    from hf_lowmem_plugins.int8_weights import int8_modules

    return {n: (m.weight_int8.clone(), m.weight_scale.clone()) for n, m in int8_modules(trainer.model)}


def test_resume_equals_the_uninterrupted_run(tmp_path):
    ref_losses, ref = _run(tmp_path / "ref", 6)
    assert (tmp_path / "ref" / "checkpoint-2" / "hf_lowmem_rng.pt").is_file()
    shutil.copytree(tmp_path / "ref" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")  # a run stopped at step 2
    losses, resumed = _run(tmp_path / "cut", 6, resume=str(tmp_path / "cut" / "checkpoint-2"))
    after = {s: x for s, x in losses.items() if s > 2}
    assert after == {s: ref_losses[s] for s in (3, 4, 5, 6)}  # exactly: the same rounding noise after the resume
    a, b = _weights(ref), _weights(resumed)
    assert a.keys() == b.keys() and a
    for n in a:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n
