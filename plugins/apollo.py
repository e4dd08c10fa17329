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

**Seeds.** apollo-torch seeds each matrix's projector with ``state["seed"]``, which its constructor sets to
the parameter's 1-based position in the optimizer's groups, and advances it at each refresh. The plugins
set it to ``seed + 1 + the parameter's position in model.parameters()`` instead, so normal, layer-wise and
differently grouped optimizers draw the same projections (and the same on every DDP rank). The projection
is drawn on the parameter's device, so CPU and CUDA runs draw different matrices.

**Layer-wise** (``*-layerwise``) reuses GaLore's layer-wise optimizer (``hf_lowmem_plugins.galore``): one
apollo-torch optimizer per parameter, stepped from post-accumulate-grad hooks on the last micro-batch of
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

from hf_lowmem import hookimpl
from hf_lowmem.errors import PluginError
from hf_lowmem.registry import PluginInfo

logger = logging.getLogger("hf_lowmem.apollo")

LAYERWISE = "-layerwise"
BASES = ("apollo", "apollo-mini")
VARIANTS = {**{n: (n, False) for n in BASES}, **{n + LAYERWISE: (n, True) for n in BASES}}
SCALE_TYPES = ("channel", "tensor")
STATE_KEY = "apollo"  # ctx.state[STATE_KEY]: what the create_optimizer hook built


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


def default_options(name: str) -> ApolloOptions:
    return ApolloMiniOptions() if VARIANTS[name][0] == "apollo-mini" else ApolloOptions()


# ------------------------------------------------------------------------------------------------
# registration, validation, the construction-time message
# ------------------------------------------------------------------------------------------------

_STREAM_REASON = ("APOLLO scales each weight's full gradient inside the optimizer; the stream engine brings its own "
                  "optimizer and never hands the Trainer one. Use APOLLO without stream, or stream with its optimizer")


@hookimpl
def hf_lowmem_register(register):
    for name, (base, layerwise) in VARIANTS.items():
        if base == "apollo":
            help_ = "APOLLO (apollo-torch): AdamW moments of a random rank-256 projection, channel-wise gradient scaling"
        else:
            help_ = "APOLLO-Mini (apollo-torch): rank-1 random projection, one scaling factor per tensor (SGD-like memory)"
        if layerwise:
            help_ += "; updated layer by layer inside backward (accumulation, clipping, DDP)"
        register(PluginInfo(
            name=name, kind="optimizer", help=help_, requires=("apollo_torch", "bitsandbytes"), extra="apollo",
            options=ApolloMiniOptions if base == "apollo-mini" else ApolloOptions, lossless=False,
            modes=("single", "ddp"), incompatible={"stream": _STREAM_REASON},
        ))


def _selected(ctx) -> str | None:
    name = ctx.selected("optimizer")
    return name if name in VARIANTS else None


_SAID: set = set()  # messages already logged in this process (each is said once)


def _say_once(level: int, msg: str) -> None:
    if msg not in _SAID:
        _SAID.add(msg)
        logger.log(level, msg)


#: eval-loss gap vs AdamW at AdamW's learning rate (x1) and the best multiplier of the grid with its gap, in %,
#: measured with the defaults (scale "auto"); where: :data:`EVIDENCE_SOURCE`.
EVIDENCE = {"apollo": {"x1": 1.50, "best": (4, -2.94)}, "apollo-mini": {"x1": 4.71, "best": (2, 3.83)}}
EVIDENCE_SOURCE = ("bench/results/quality_cpu_pretrain.json: a 0.9M-parameter byte-level Llama trained from scratch "
                   "for 200 steps on the CPU, AdamW at lr 1e-3, the best of AdamW's own grid")


def evidence_note(evidence: dict, lr: float) -> tuple[bool, str]:
    """(lossy at your learning rate, one sentence with the measured numbers) for an entry of ``EVIDENCE``:
    lossy is more than 2% above AdamW at AdamW's learning rate; the fix offered is the best multiplier of
    the grid when it brings the gap within 2%."""
    mult, best = evidence["best"]
    lossy = evidence["x1"] > 2.0
    at_best = (f"{best:+.1f}% at {mult:g}x it, the best of x0.5-x4" if mult != 1 else
               "no better at x0.5, x2 or x4")
    text = f"measured {evidence['x1']:+.1f}% eval loss vs AdamW at AdamW's learning rate and {at_best} ({EVIDENCE_SOURCE})"
    if lossy and best <= 2.0 and mult != 1:
        text += f"; if {lr:g} is your AdamW learning rate, use about {mult * lr:g}"
    elif lossy:
        text += "; no learning rate of that grid came within 2% of AdamW, so expect a gap where quality matters"
    return lossy, text


def lr_message(name: str, opts: ApolloOptions, lr: float) -> tuple[int, str]:
    """(logging level, text) that the plugin logs once at construction: how its step relates to AdamW's at
    the learning rate ``lr``, what was measured, and what to change when it does not match."""
    base = VARIANTS[name][0]
    if opts.scale == "auto":
        lossy, note = evidence_note(EVIDENCE[base], lr)
        return (logging.WARNING if lossy else logging.INFO), (
            f"{name}: scale=\"auto\": each target matrix's update is scaled by sqrt(n / rank) (n its smaller side), "
            f"so its RMS is about AdamW's at the same learning rate ({lr:g}); {note}")
    ratio_note = (f"its update RMS is about sqrt(scale * rank / n) = sqrt({opts.scale:g} * {opts.rank} / n) times "
                  f"AdamW's at the same learning rate (n = the smaller side of each matrix: "
                  f"{_ratio(opts, 576):.2f}x for n=576, {_ratio(opts, 4096):.2f}x for n=4096)")
    return logging.WARNING, (
        f"{name}: fixed scale={opts.scale:g} with rank {opts.rank}: {ratio_note}. At your AdamW learning rate "
        f"({lr:g}) it therefore takes smaller steps; the APOLLO paper trains with this scale at 10x AdamW's "
        f"learning rate (1e-2 against 1e-3). Either raise learning_rate by about 1/ratio, or use scale=\"auto\" "
        "(the default), which matches AdamW's step at your learning rate")


def _ratio(opts: ApolloOptions, n: int) -> float:
    return math.sqrt(float(opts.scale) * min(opts.rank, n) / n)


def layerwise_clip_message(name: str, max_grad_norm: float) -> str:
    return (f"{name}: max_grad_norm={max_grad_norm:g}: exact clipping keeps every parameter's full gradient until "
            "backward ends (APOLLO multiplies the full gradient by a factor that depends on the clipped moments), so "
            "the layer-wise variant saves no gradient memory over the normal one. Set max_grad_norm=0 to free "
            "gradients layer by layer inside backward (APOLLO's norm-growth limiter still bounds each step's growth)")


@hookimpl
def hf_lowmem_validate(ctx):
    name = _selected(ctx)
    if name is None:
        return
    opts = ctx.options(name) or default_options(name)
    if VARIANTS[name][1]:
        if getattr(ctx.args, "fp16", False):
            raise PluginError(f"plugin {name!r} updates parameters inside backward, before a fp16 gradient scaler "
                              "could unscale and check the gradients: train with bf16=True (or fp32) instead of fp16")
        if (ctx.args.max_grad_norm or 0) > 0:
            _say_once(logging.WARNING, layerwise_clip_message(name, ctx.args.max_grad_norm))
    level, msg = lr_message(name, opts, ctx.args.learning_rate)
    _say_once(level, msg)


@hookimpl
def hf_lowmem_callbacks(ctx):
    name = _selected(ctx)
    if name is None or not VARIANTS[name][1]:
        return None
    from hf_lowmem_plugins import galore

    return [galore._layerwise_callback(_GaloreStateView(ctx))]


class _GaloreStateView:
    """What GaLore's layer-wise callback reads (``ctx.state[galore.STATE_KEY]["optimizer"]``), pointing at the
    optimizer this plugin built."""

    def __init__(self, ctx):
        self._ctx = ctx

    @property
    def state(self) -> dict:
        from hf_lowmem_plugins import galore

        built = self._ctx.state.get(STATE_KEY)
        return {galore.STATE_KEY: built} if built else {}


# ------------------------------------------------------------------------------------------------
# parameter groups, seeds, building apollo-torch's optimizer
# ------------------------------------------------------------------------------------------------

def matrix_scale(shape, opts: ApolloOptions) -> float:
    """apollo-torch's ``scale`` for a target matrix of ``shape``: ``n / rank`` under ``"auto"``."""
    if opts.scale != "auto":
        return float(opts.scale)
    return min(shape) / opts.rank


def apollo_param_groups(trainer, model, opts: ApolloOptions, targets) -> list[dict]:
    """The Trainer's weight-decay split, crossed with target / not target; target groups carry apollo-torch's
    keys and are split further by their ``scale`` (one group per distinct value). Empty groups are dropped."""
    decay = set(trainer.get_decay_parameter_names(model))
    scale_of = {id(m.weight): matrix_scale(m.weight.shape, opts) for _, m in targets}
    wd = trainer.args.weight_decay
    buckets: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((n in decay, scale_of.get(id(p))), []).append(p)
    groups = []
    for (has_decay, scale), params in buckets.items():
        group = {"params": params, "weight_decay": wd if has_decay else 0.0}
        if scale is not None:
            group.update(rank=opts.rank, proj="random", scale_type=opts.scale_type, update_proj_gap=opts.update_proj_gap,
                         scale=scale, proj_type="std")
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


@hookimpl
def hf_lowmem_create_optimizer(ctx, model, trainer):
    name = _selected(ctx)
    if name is None:
        return None
    ctx.info(name).import_requirements()
    from hf_lowmem_plugins.galore import LayerwiseOptimizer, select_targets

    layerwise = VARIANTS[name][1]
    opts = ctx.options(name) or default_options(name)
    targets = select_targets(model, opts, name)
    groups = apollo_param_groups(trainer, model, opts, targets)
    seeds = projection_seeds(model, opts)
    _register_safe_globals()
    if layerwise:
        opt = LayerwiseOptimizer(groups, lambda gs: build_optimizer(gs, ctx.args, opts, seeds), {}, trainer=trainer,
                                 max_grad_norm=ctx.args.max_grad_norm, plugin=name)
    else:
        opt = build_optimizer(groups, ctx.args, opts, seeds)
    scales = sorted({g["scale"] for g in groups if "rank" in g})
    ctx.state[STATE_KEY] = {"optimizer": opt, "targets": [n for n, _ in targets], "plugin": name, "scales": scales}
    logger.info("%s: %d target matrices (rank %d, %s-wise, scale %s), %d parameter groups", name, len(targets),
                opts.rank, opts.scale_type, ", ".join(f"{s:g}" for s in scales), len(groups))
    return opt
