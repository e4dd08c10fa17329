"""APOLLO and APOLLO-Mini (the ``apollo-torch`` package) as hf-lowmem plugins, including layer-wise updates.

Plugins: ``apollo``, ``apollo-mini`` and their layer-wise variants ``apollo-layerwise``,
``apollo-mini-layerwise``.

APOLLO (Zhu et al., 2024, "SGD-like memory, AdamW-level performance") keeps AdamW's moments only for a
random projection of each weight matrix's gradient: ``R = G P^T`` (m x r, ``P`` an r x n Gaussian matrix
with variance 1/r, ``n`` the smaller side, refreshed every ``update_proj_gap`` steps from a seeded
generator; no SVD). From the normalised low-rank update ``N = m_hat / (sqrt(v_hat) + eps)`` it takes a
scaling factor per channel (``||N_i|| / ||R_i||``, APOLLO) or per tensor (``||N|| / ||R||``,
APOLLO-Mini) and applies it to the *raw full gradient*: ``update = G * factor * sqrt(scale)``, after a
norm-growth limiter (from Fira: the update's norm may grow at most 1.01x per step). State per m x n
matrix: two m x r moments and the r x n projection (rank 1 for APOLLO-Mini: SGD-like memory).
Parameters that are not targets (embeddings, norms, the LM head) get apollo-torch's plain AdamW update.

**Targets** are GaLore's rule (``hf_lowmem_plugins.galore.select_targets``): the ``nn.Linear`` layers of
attention and MLP blocks inside the decoder layers, whose smaller side exceeds ``rank``; ``target_modules``
(regexes) overrides it.

**The learning rate you already have.** At the same learning rate, APOLLO's step is not AdamW's step.
Early in training Adam's normalised update has entries of size ~1, so ``||N_i|| ~ sqrt(r)`` while
``||R_i|| ~ ||G_i||`` (a Gaussian projection keeps norms on average): the update RMS is about
``sqrt(scale * r / n)`` times AdamW's, for both channel- and tensor-wise scaling. The paper's settings
(APOLLO: rank 256 or n/4 with scale 1; APOLLO-Mini: rank 1 with scale 128) therefore make steps 0.2-0.5x
AdamW's on 576- to 4096-wide models, and the paper trains them at lr 1e-2, 10x its AdamW's. Here
``scale="auto"`` (the default) sets ``scale = n / r`` per matrix, so the update's RMS matches AdamW's at
the learning rate you already use; a number restores apollo-torch's fixed scale (then the learning rate
must move with it, and the plugin says so at construction, with the factor for your shapes).

**Measured** (``EVIDENCE``; bench/results/quality_gpu.md, an H200, eval loss vs AdamW at AdamW's learning rate):
APOLLO with ``scale="auto"`` +4.20% pretraining a 25.6M Llama from scratch (its best of x0.5-x8: +13.06% at 0.5x,
+4.41% at 2x, +13.27% at 4x, +32.19% at 8x) and +0.96% fine-tuning SmolLM2-135M (+0.23% at 2x, -0.02% at 4x, its
best); the paper's fixed scale 1 +8.45% (+2.28% at 2x, its best) and +1.29% (x1 only). APOLLO-Mini +25.38%
(+19.03% at 2x, its best) and +0.74% (-0.01% at 4x); its fixed 128 +33.68% (+21.33% at 2x; x8 not run) and
+1.41% (x1 only). So ``"auto"`` halves the gap at your learning rate, but both are lossy in pretraining at this
size, at every multiplier from 0.5x to 8x; they keep quality in fine-tuning, where 4x your learning rate reached
AdamW's.

**Seeds.** apollo-torch seeds each matrix's projector with ``state["seed"]``, which its constructor sets to
the parameter's 1-based position in the optimizer's groups, and advances it at each refresh. The plugins
set it to ``seed + 1 + the parameter's position in model.parameters()`` instead, so normal, layer-wise and
differently grouped optimizers draw the same projections (and the same on every DDP rank). The projection
is drawn on the parameter's device, so CPU and CUDA runs draw different matrices.

**Parameter groups.** The Trainer's own groups (``hf_lowmem.context.trainer_param_groups``: its weight-decay
split), each split into non-targets and targets, and targets by their ``scale``; target groups carry
apollo-torch's keys. So the plugins build the optimizer themselves (``create_optimizer``), over those groups.

**Memory** (the planner's model, :meth:`ApolloPlugin.memory_model`): per target matrix m x n, the two
moments of the projected gradient (max(m, n) x rank each) and the rank x min(m, n) projection, in the
parameters' dtype: ``bytes * rank * (2 max(m, n) + min(m, n))`` (4 bytes in fp32: ~0.3% of AdamW's 8 m n at
rank 256 on a 4096-wide model); AdamW's two states for everything else.

**Layer-wise** (``*-layerwise``) reuses GaLore's layer-wise optimizer and callback
(``LayerwiseOptimizer`` and ``layerwise_callback`` of :mod:`hf_lowmem_plugins.galore_layerwise`):
one apollo-torch optimizer per parameter, stepped from post-accumulate-grad hooks on the last micro-batch of
each accumulation window, with its own all-reduce under DDP. Gradient clipping is exact but, unlike
GaLore's, cannot be done on the projected gradient alone: APOLLO's update multiplies the *full* gradient,
and its factor depends on the clipped moments. With ``max_grad_norm > 0`` each hook therefore keeps its
parameter's gradient until backward ends, and ``optimizer.step()`` clips and steps: the same updates as
the normal optimizer, but no gradient memory saved. The plugin says so at construction; with
``max_grad_norm=0`` (APOLLO's norm-growth limiter already bounds each step's growth) the gradients are
freed layer by layer inside backward.

Not supported: FSDP and DeepSpeed (flattened parameters lose the 2-D shapes APOLLO projects), fp16 with a
gradient scaler for the layer-wise variants (use bf16), the ``stream`` engine (it brings its own optimizer).
apollo-torch 1.0.3 imports bitsandbytes from its package ``__init__`` (for its 8-bit GaLore and Q-APOLLO
classes), so it needs bitsandbytes installed even though these plugins use none of it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hf_lowmem import Plugin, hookimpl
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, measured_sentence, say_once
from hf_lowmem_plugins.lr_evidence import lr_message as evidence_message

logger = logging.getLogger("hf_lowmem.apollo")

LAYERWISE = "-layerwise"
BASES = ("apollo", "apollo-mini")
VARIANTS = {**{n: (n, False) for n in BASES}, **{n + LAYERWISE: (n, True) for n in BASES}}
SCALE_TYPES = ("channel", "tensor")
STATE_KEY = "apollo"  # ctx.state[STATE_KEY]: what create_optimizer built (for the layer-wise callback and tests)

#: what bench/quality.py measured (bench/results/quality_gpu.md), per base plugin: with scale "auto" (the default:
#: n / rank = 2 on the 512-wide pretraining model, 2.25 on SmolLM2's 576 for apollo's rank 256; 512 and 576 for
#: apollo-mini's rank 1) and with the paper's fixed scale, keyed by its value (measured at the default rank only).
#: The layer-wise variants make the same updates (tests/test_apollo.py), so they share these numbers.
EVIDENCE = {
    "apollo": {
        "auto": Evidence((Measured(4.20, 1, 4.20, PRETRAIN), Measured(0.96, 4, -0.02, FINETUNE)), "apollo"),
        1.0: Evidence((Measured(8.45, 2, 2.28, PRETRAIN), Measured(1.29, 1, 1.29, FINETUNE, mults=(1.0,))),
                      "apollo-scale1", measured_as="apollo with rank 256 and the paper's fixed scale 1"),
    },
    "apollo-mini": {
        "auto": Evidence((Measured(25.38, 2, 19.03, PRETRAIN), Measured(0.74, 4, -0.01, FINETUNE)), "apollo-mini"),
        128.0: Evidence((Measured(33.68, 2, 21.33, PRETRAIN, mults=(0.5, 1.0, 2.0, 4.0)),
                         Measured(1.41, 1, 1.41, FINETUNE, mults=(1.0,))),
                        "apollo-mini-scale128", measured_as="apollo-mini with rank 1 and the paper's fixed scale 128"),
    },
}


@dataclass
class ApolloOptions:
    """Options of the ``apollo`` plugins (``lowmem_options={"apollo": {...}}``).

    :param rank: rank of the random projection (of the low-rank moments) of each target matrix.
    :param scale: ``"auto"``: ``n / rank`` per matrix (``n`` its smaller side), which makes the update's
        RMS about AdamW's at the same learning rate; or a number, apollo-torch's fixed ``scale`` (the
        update is multiplied by its square root).
    :param scale_type: ``channel`` (a factor per row or column: APOLLO) or ``tensor`` (one per matrix).
    :param update_proj_gap: steps between two redraws of a matrix's random projection.
    :param norm_growth_limiter: cap the growth of each update's norm at 1.01x per step (apollo-torch's
        default; ``False`` is its ``disable_nl=True``).
    :param scale_front: apply ``sqrt(scale)`` before the limiter instead of after (apollo-torch's option).
    :param target_modules: regexes searched in module names; ``None`` picks the attention/MLP linears.
    :param seed: added to each parameter's position to seed its projection.
    """

    rank: int = 256
    scale: Any = "auto"
    scale_type: str = "channel"
    update_proj_gap: int = 200
    norm_growth_limiter: bool = True
    scale_front: bool = False
    target_modules: list[str] | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.scale != "auto" and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
                                     or not self.scale > 0):
            raise ValueError(f"scale must be \"auto\" or a positive number, got {self.scale!r}")
        if self.scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {', '.join(SCALE_TYPES)}, got {self.scale_type!r}")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be a positive integer, got {self.update_proj_gap!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.target_modules is not None:
            from hf_lowmem_plugins.galore import GaLoreOptions

            self.target_modules = GaLoreOptions(target_modules=self.target_modules).target_modules  # same checks


@dataclass
class ApolloMiniOptions(ApolloOptions):
    """Options of the ``apollo-mini`` plugins: APOLLO with rank 1 and one scaling factor per tensor (the
    paper's APOLLO-Mini; apollo-torch's fixed setting for it is ``scale=128``)."""

    rank: int = 1
    scale_type: str = "tensor"


# ------------------------------------------------------------------------------------------------
# the construction-time messages
# ------------------------------------------------------------------------------------------------

def lr_message(name: str, opts: ApolloOptions, lr: float) -> tuple[int, str]:
    """(logging level, text) that the plugin logs once at construction: how its step relates to AdamW's at
    the learning rate ``lr``, what was measured, and what to change when it does not match."""
    base = VARIANTS[name][0]
    if opts.scale == "auto":
        why = ("scale=\"auto\": each target matrix's update is scaled by sqrt(n / rank) (n its smaller side), so its "
               "RMS is about AdamW's at the same learning rate")
        return evidence_message(name, EVIDENCE[base]["auto"], lr, why)
    ratio_note = (f"its update RMS is about sqrt(scale * rank / n) = sqrt({opts.scale:g} * {opts.rank} / n) times "
                  f"AdamW's at the same learning rate (n = the smaller side of each matrix: "
                  f"{_ratio(opts, 576):.2f}x for n=576, {_ratio(opts, 4096):.2f}x for n=4096)")
    default_rank = (ApolloMiniOptions if base == "apollo-mini" else ApolloOptions).rank
    measured = EVIDENCE[base].get(float(opts.scale)) if opts.rank == default_rank else None
    text = (f"{name}: fixed scale={opts.scale:g} with rank {opts.rank}: {ratio_note}. At your AdamW learning rate "
            f"({lr:g}) it therefore takes smaller steps; the APOLLO paper trains with a fixed scale at 10x AdamW's "
            f"learning rate (1e-2 against 1e-3). Either raise learning_rate by about 1/ratio, or use scale=\"auto\" "
            "(the default), which matches AdamW's step at your learning rate")
    if measured is not None:
        text += f"; {measured_sentence(measured)}"
    return logging.WARNING, text


def _ratio(opts: ApolloOptions, n: int) -> float:
    return math.sqrt(float(opts.scale) * min(opts.rank, n) / n)


def layerwise_clip_message(name: str, max_grad_norm: float) -> str:
    return (f"{name}: max_grad_norm={max_grad_norm:g}: exact clipping keeps every parameter's full gradient until "
            "backward ends (APOLLO multiplies the full gradient by a factor that depends on the clipped moments), so "
            "the layer-wise variant saves no gradient memory over the normal one. Set max_grad_norm=0 to free "
            "gradients layer by layer inside backward (APOLLO's norm-growth limiter still bounds each step's growth)")


# ------------------------------------------------------------------------------------------------
# the plugins
# ------------------------------------------------------------------------------------------------

_STREAM_REASON = ("APOLLO scales each weight's full gradient inside the optimizer; the stream engine brings its own "
                  "optimizer and never hands the Trainer one. Use APOLLO without stream, or stream with its optimizer")


class ApolloPlugin(Plugin):
    """One APOLLO variant: ``apollo`` or ``apollo-mini``, updated layer by layer inside backward or not."""

    kind, extra, lossless, modes = "optimizer", "apollo", False, ("single", "ddp")
    requires = ("apollo_torch", "bitsandbytes")
    incompatible = {"stream": _STREAM_REASON}

    def __init__(self, name: str):
        base, layerwise = VARIANTS[name]
        if base == "apollo":
            help_ = ("APOLLO (apollo-torch): AdamW moments of a random rank-256 projection, channel-wise gradient "
                     "scaling; scale \"auto\" keeps AdamW's step size")
        else:
            help_ = ("APOLLO-Mini (apollo-torch): rank-1 random projection, one scaling factor per tensor (SGD-like "
                     "memory); scale \"auto\" keeps AdamW's step size")
        if layerwise:
            help_ += "; updated layer by layer inside backward (accumulation, clipping, DDP)"
        measured = EVIDENCE[base]["auto"]
        super().__init__(name=name, help=help_, options=ApolloMiniOptions if base == "apollo-mini" else ApolloOptions,
                         quality_gap=measured.gap_pct, lr_advice=advice(measured, name))
        self.base, self.layerwise = base, layerwise

    def validate(self, ctx):
        if self.layerwise:
            from hf_lowmem_plugins.galore_layerwise import refuse_fp16

            refuse_fp16(self.name, ctx.args)
            if (ctx.args.max_grad_norm or 0) > 0:
                say_once(logger, logging.WARNING, layerwise_clip_message(self.name, ctx.args.max_grad_norm))
        say_once(logger, *lr_message(self.name, ctx.options(self.name), ctx.args.learning_rate))

    def callbacks(self, ctx):
        if not self.layerwise:
            return []
        from hf_lowmem_plugins.galore_layerwise import layerwise_callback

        return [layerwise_callback(lambda: (ctx.state.get(STATE_KEY) or {}).get("optimizer"))]

    def create_optimizer(self, ctx, model, trainer):
        from hf_lowmem.context import trainer_param_groups
        from hf_lowmem_plugins.galore import select_targets
        from hf_lowmem_plugins.galore_layerwise import LayerwiseOptimizer

        opts = ctx.options(self.name)
        targets = select_targets(model, opts, self.name)
        groups = apollo_param_groups(trainer_param_groups(trainer, model), opts, targets)
        seeds = projection_seeds(model, opts)
        _register_safe_globals()
        if self.layerwise:
            opt = LayerwiseOptimizer(groups, lambda gs: build_optimizer(gs, ctx.args, opts, seeds), {},
                                     trainer=trainer, max_grad_norm=ctx.args.max_grad_norm, plugin=self.name)
        else:
            opt = build_optimizer(groups, ctx.args, opts, seeds)
        scales = sorted({g["scale"] for g in groups if "rank" in g})
        ctx.state[STATE_KEY] = {"optimizer": opt, "targets": [n for n, _ in targets], "plugin": self.name,
                                "scales": scales}
        logger.info("%s: %d target matrices (rank %d, %s-wise, scale %s), %d parameter groups", self.name,
                    len(targets), opts.rank, opts.scale_type, ", ".join(f"{s:g}" for s in scales), len(groups))
        return opt

    def memory_model(self, plan, st):
        from hf_lowmem.planner import PlanRefused

        opts = self.options_for(plan)
        sh, su = plan.shape, plan.setup
        pb, rank = su.param_bytes, opts.rank
        mats = sh.layer_matrices
        if opts.target_modules is None and not any(min(r, c) > rank for _, (r, c) in mats):
            raise PlanRefused(f"{self.name}: no projection has both sides larger than rank {rank}")
        states = low = 0.0
        proj_flops = 0.0
        for _name, (r, c) in mats:
            if min(r, c) > rank:  # a target: two low-rank moments and the random projection
                states += pb * rank * (2 * max(r, c) + min(r, c))
                low = max(low, rank * max(r, c))
                proj_flops += 2.0 * r * c * rank
            else:
                states += 2.0 * pb * r * c
        states *= sh.n_layers
        rest = (sh.embed_params + sh.head_params + sh.other_params
                + sh.n_layers * (sh.layer_params[0] - sh.linear_layer_params))
        st.states = states + 2.0 * pb * rest
        big = max((r * c for _, (r, c) in mats), default=0)
        # one parameter at a time: a non-target's AdamW temporaries (denominator, update), or a target's scaled
        # full gradient plus its projected gradient, normalised update and denominator
        st.opt_ws = max(2.0 * sh.largest_param * pb, big * pb + 3.0 * low * pb)
        st.opt_bytes_per_param = 5 * pb + 2
        st.opt_kernel_factor = 3.0
        st.opt_extra_seconds = proj_flops * sh.n_layers / (plan.device.fp32_tflops * 1e12)
        if self.layerwise:
            if su.max_grad_norm and su.max_grad_norm > 0:
                st.notes.append(f"{self.name} with max_grad_norm > 0 keeps every full gradient until the step (exact "
                                "clipping); max_grad_norm=0 frees them inside backward")
            else:
                if su.grad_accum > 1:
                    st.notes.append(f"{self.name} with gradient accumulation keeps the window's full gradients until "
                                    "its last micro-batch (the saving is in the last backward and the step)")
                st.grad_free_per_param = True


@hookimpl
def hf_lowmem_register(register):
    for name in VARIANTS:
        register(ApolloPlugin(name))


# ------------------------------------------------------------------------------------------------
# parameter groups, seeds, building apollo-torch's optimizer
# ------------------------------------------------------------------------------------------------

def matrix_scale(shape, opts: ApolloOptions) -> float:
    """apollo-torch's ``scale`` for a target matrix of ``shape``: ``n / rank`` under ``"auto"``."""
    if opts.scale != "auto":
        return float(opts.scale)
    return min(shape) / opts.rank


def apollo_param_groups(trainer_groups: list[dict], opts: ApolloOptions, targets) -> list[dict]:
    """The Trainer's parameter groups (its weight-decay split), each split into non-targets and targets, targets
    further by their ``scale`` (one group per distinct value); target groups carry apollo-torch's keys. Empty
    groups are dropped."""
    scale_of = {id(m.weight): matrix_scale(m.weight.shape, opts) for _, m in targets}
    groups = []
    for tg in trainer_groups:
        hyper = {k: v for k, v in tg.items() if k != "params"}
        buckets: dict = {}
        for p in tg["params"]:
            buckets.setdefault(scale_of.get(id(p)), []).append(p)
        for scale, params in buckets.items():
            group = {**hyper, "params": params}
            if scale is not None:
                group.update(rank=opts.rank, proj="random", scale_type=opts.scale_type,
                             update_proj_gap=opts.update_proj_gap, scale=scale, proj_type="std")
            groups.append(group)
    return groups


def projection_seeds(model, opts: ApolloOptions) -> dict:
    """Parameter -> the seed of its random projection: ``seed + 1 + position in model.parameters()``."""
    return {p: opts.seed + 1 + i for i, p in enumerate(model.parameters())}


def build_optimizer(groups: list[dict], args, opts: ApolloOptions, seeds: dict):
    """apollo-torch's ``APOLLOAdamW`` over ``groups`` with the Trainer's hyperparameters and our seeds."""
    from apollo_torch import APOLLOAdamW

    opt = APOLLOAdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                      weight_decay=args.weight_decay, correct_bias=True, scale_front=opts.scale_front,
                      disable_nl=not opts.norm_growth_limiter)
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p]["seed"] = seeds[p]
    return opt


def _register_safe_globals() -> None:
    """The optimizer state holds apollo-torch's ``GradientProjector`` objects (a tensor and numbers); the
    Trainer reloads checkpoints with ``torch.load(weights_only=True)``, which needs the class allow-listed."""
    import torch
    from apollo_torch.random_projector import GradientProjector

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([GradientProjector])
