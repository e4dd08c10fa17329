"""The small interface between ``LowMemTrainer`` and a training engine.

An engine takes over where weights live and how one optimizer step runs (forward, backward, gradient
clipping, the update), while the Hugging Face Trainer keeps everything else: data loading, the LR
scheduler, logging, callbacks, evaluation scheduling, checkpoints. The trainer calls, per optimizer step:

1. :meth:`TrainingEngine.begin_window` with every micro-batch of the accumulation window;
2. :meth:`TrainingEngine.training_step` once per micro-batch (the engine may do all the work on the
   first call and return the stored loss on the others);
3. :meth:`TrainingEngine.clip_grad_norm` (or :meth:`grad_norm` when clipping is off);
4. ``engine.optimizer.step()`` through the Trainer, which also steps the LR scheduler.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainingEngine(Protocol):
    #: the optimizer the Trainer steps and checkpoints (``state_dict`` / ``load_state_dict``)
    optimizer: torch.optim.Optimizer

    def begin_window(self, batches: list[dict[str, Any]], num_items_in_batch: Any) -> None:
        """Receive all micro-batches of the next optimizer step before the first ``training_step``."""

    def training_step(self, inputs: dict[str, Any], num_items_in_batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch; return its detached loss on ``args.device``,
        scaled as the Trainer would scale it."""

    def clip_grad_norm(self, max_norm: float) -> float:
        """Total gradient norm of the window; gradients are clipped to ``max_norm`` (``inf``: no clip)."""

    def eval_loss(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The mean loss of a batch with no gradient (for ``Trainer.evaluate``)."""

    def flush(self) -> None:
        """Make the model's parameters current (apply deferred updates) before saving or evaluating."""
