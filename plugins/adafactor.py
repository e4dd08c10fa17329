"""Adafactor (``transformers.optimization.Adafactor``) as the hf-lowmem plugin ``adafactor``.

Adafactor keeps a factored second moment (a row and a column vector per weight matrix) and, by default
here, no first moment: its state is O(m + n) per m x n matrix instead of AdamW's 2 m n.

Defaults are the fine-tuning settings the transformers documentation recommends: the Trainer's learning
rate and schedule (``relative_step=False``, ``scale_parameter=False``, ``warmup_init=False``), update
clipping at RMS 1.0, and the Trainer's weight-decay groups. ``relative_step=True`` selects Adafactor's own
time-dependent step size instead; the plugin then gives the Trainer Adafactor's schedule
(``AdafactorSchedule``, which reports that step size as the learning rate), so ``learning_rate`` and
``lr_scheduler_type`` no longer apply.

**Defaults checked against the quality table** (``EVIDENCE``; bench/results/quality_gpu.md, an H200, eval loss
against AdamW at AdamW's learning rate, on the grid x0.5, x1, x2, x4, x8 of it). Pretraining a 25.6M Llama from
scratch (300 steps, lr 1e-3): **+10.17%** at x1; +9.03% at 0.5x (its best, and the smallest multiple run; AdamW
itself was -4.03% there), +17.24% at 2x, +37.27% at 4x, +47.62% at 8x. Fine-tuning SmolLM2-135M (200 steps, lr
5e-5): +0.04% at x1; -0.54% at 2x (its best; AdamW -0.53% there), -0.16% at 4x, +1.19% at 0.5x (AdamW +1.12%),
+1.49% at 8x (AdamW +1.63%). So issue 16's +20% in pretraining is confirmed in kind (+10%), and no learning rate
of the grid fixes it: its best is still 9% behind AdamW at x1. In fine-tuning, the regime these defaults are the
transformers documentation's settings for, it follows AdamW at every multiple. No multiple wins in both regimes
(2x: -0.54% fine-tuning but +17.24% pretraining; 0.5x: +9.03% pretraining but +1.19% fine-tuning), so the
defaults are kept, and the plugin warns in pretraining, with these numbers, at construction. What differs from
AdamW is the absent first moment (``beta1=None``, the memory saving), the factored second moment and the RMS-1
update clipping; no setting of them was run in the grid. Its update is normalised by the factored second moment
and clipped at RMS 1, so its entries have AdamW's size at the same learning rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hf_lowmem import Plugin, hookimpl
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, gaps, lr_message, say_once

NAME = "adafactor"
logger = logging.getLogger("hf_lowmem.adafactor")

#: what bench/quality.py measured with the defaults below (bench/results/quality_gpu.md)
EVIDENCE = Evidence((Measured(10.17, 0.5, 9.03, PRETRAIN), Measured(0.04, 2, -0.54, FINETUNE)), "adafactor")
#: what the defaults leave unmeasured, said with the numbers
UNMEASURED = ("not measured: a first moment (beta1=0.9, 4 more bytes per parameter), other clipping or decay "
              "settings, or learning rates below 0.5x in pretraining")


@dataclass
class AdafactorOptions:
    """Options of the ``adafactor`` plugin (names as in ``transformers.optimization.Adafactor``).

    :param scale_parameter: scale the step by the RMS of the parameter.
    :param relative_step: Adafactor's own time-dependent step size instead of the Trainer's learning rate.
    :param warmup_init: warm the relative step up (needs ``relative_step``).
    :param clip_threshold: cap on the RMS of the update.
    :param decay_rate: exponent of the second-moment decay (``-0.8``).
    :param beta1: first-moment decay; ``None`` keeps no first moment (the memory saving).
    :param eps: regularisation constants for the squared gradient and the parameter scale.
    """

    scale_parameter: bool = False
    relative_step: bool = False
    warmup_init: bool = False
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    beta1: float | None = None
    eps: list[float] = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.eps is None:
            self.eps = [1e-30, 1e-3]
        if len(self.eps) != 2:
            raise ValueError(f"eps must be two numbers, got {self.eps!r}")
        if self.warmup_init and not self.relative_step:
            raise ValueError("warmup_init=True needs relative_step=True")
        if self.beta1 is not None and not 0.0 <= self.beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1) or null, got {self.beta1!r}")
        if self.clip_threshold <= 0:
            raise ValueError(f"clip_threshold must be > 0, got {self.clip_threshold!r}")


class AdafactorPlugin(Plugin):
    name, kind, options, lossless = NAME, "optimizer", AdafactorOptions, False
    help = "Adafactor (transformers): factored second moment, no first moment by default; fine-tuning defaults"
    quality_gap, lr_advice = EVIDENCE.gap_pct, advice(EVIDENCE)

    def validate(self, ctx):
        o = ctx.options(NAME)
        if o.relative_step:
            say_once(logger, logging.INFO, (
                f"{NAME}: relative_step=True: Adafactor's own step size, min(1e-2, 1/sqrt(step))"
                + (" x the parameter's RMS" if o.scale_parameter else "") + f", replaces your learning rate "
                f"({ctx.args.learning_rate:g}) and schedule; not measured against AdamW (relative_step=False, the "
                f"default, was {gaps(EVIDENCE)} at AdamW's learning rate)"))
            return
        why = ("its update is normalised by a factored second moment and clipped at RMS "
               f"{o.clip_threshold:g}, so its entries have AdamW's size at the same learning rate; it keeps "
               + ("no first moment (beta1=None)" if o.beta1 is None else
                  f"a first moment (beta1={o.beta1:g}); the numbers below are the defaults' (no first moment)"))
        level, text = lr_message(NAME, EVIDENCE, ctx.args.learning_rate, why)
        say_once(logger, level, f"{text}. {UNMEASURED}")

    def optimizer_cls_and_kwargs(self, ctx, model):
        from transformers.optimization import Adafactor

        o = ctx.options(NAME)
        return Adafactor, dict(
            lr=None if o.relative_step else ctx.args.learning_rate, eps=tuple(o.eps),
            clip_threshold=o.clip_threshold, decay_rate=o.decay_rate, beta1=o.beta1,
            weight_decay=ctx.args.weight_decay, scale_parameter=o.scale_parameter,
            relative_step=o.relative_step, warmup_init=o.warmup_init,
        )

    def create_optimizer(self, ctx, model, trainer):
        from transformers.optimization import AdafactorSchedule

        optimizer = super().create_optimizer(ctx, model, trainer)
        if ctx.options(NAME).relative_step and getattr(trainer, "lr_scheduler", None) is None:
            # the Trainer only builds a scheduler when it has none; a LambdaLR over lr=None would fail
            trainer.lr_scheduler = AdafactorSchedule(optimizer)
        return optimizer

    def memory_model(self, plan, st):
        sh = plan.shape
        factored = sh.n_layers * sum(r + c for _, (r, c) in sh.layer_matrices) + sh.vocab + sh.hidden
        vectors = sh.params_total - sh.n_layers * sh.linear_layer_params - sh.embed_params - sh.head_params
        heads = 2 if sh.head_params else 1
        st.states = 4 * (factored + (heads - 1) * (sh.vocab + sh.hidden) + vectors)
        # unfused per-parameter update: the fp32 gradient, fp32 weight copy (for bf16 weights) and the update
        pb = plan.setup.param_bytes
        st.opt_ws = sh.largest_param * 4 * (3 if pb == 2 else 1)
        st.opt_bytes_per_param = 4 * pb + 8
        st.opt_kernel_factor = 4.0


@hookimpl
def hf_lowmem_register(register):
    register(AdafactorPlugin())
