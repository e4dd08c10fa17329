"""GaLore optimizers (the ``galore-torch`` package) as hf-lowmem plugins, including layer-wise updates.

Plugins: ``galore-adamw``, ``galore-adamw8bit``, ``galore-adafactor`` and their layer-wise variants
``galore-adamw-layerwise``, ``galore-adamw8bit-layerwise``, ``galore-adafactor-layerwise``.

GaLore (Zhao et al., 2024) keeps the optimizer state of a weight matrix ``W`` (m x n) in a rank-``r``
subspace: the gradient ``G`` is projected to ``R = G P^T`` (or ``P^T G``), the inner optimizer (AdamW,
8-bit AdamW, Adafactor from galore-torch) updates on ``R``, and the update is projected back and scaled.
``P`` comes from the SVD of the gradient and is refreshed every ``update_proj_gap`` steps. Parameters
that are not GaLore targets (embeddings, norms, the LM head) get the same optimizer at full rank.

**The learning rate you already have** (``scale="auto"``, the default). The inner optimizer's update ``N`` on
``R`` has AdamW-sized entries, but ``P`` has orthonormal rows, so projecting back spreads the same norm over
``n / r`` times as many entries: the update's RMS is ``scale * sqrt(r / n)`` times AdamW's at the same learning
rate (``n`` the side the projector reduces to ``r``). galore-torch's default ``scale=0.25`` therefore makes
steps 0.12x AdamW's on a 576-wide model at rank 128 and 0.04x on a 4096-wide one, and GaLore's paper trains at
several times AdamW's learning rate. ``scale="auto"`` sets ``scale = sqrt(n / r)`` per matrix, so the update's
RMS is AdamW's at your learning rate. Measured against AdamW at AdamW's learning rate (``EVIDENCE`` below;
bench/results/quality_gpu.md, an H200): galore-adamw -7.30% eval loss pretraining a 25.6M Llama from scratch and
+0.34% fine-tuning SmolLM2-135M (galore-adamw8bit -8.37% and +0.38%), where ``scale=0.25`` was +14.46% and
+3.41% (it needs 4-8x the learning rate: -8.23% at 4x and -9.63% at 8x in pretraining, +1.62% and +1.46% in
fine-tuning). A number restores a fixed scale, and the plugin then says at construction how much smaller its
steps are.

What this module adds to galore-torch (its optimizers do the arithmetic; the glue here is our own; the
projector lives in :mod:`hf_lowmem_plugins.galore_projector`, the layer-wise optimizer in
:mod:`hf_lowmem_plugins.galore_layerwise`):

**Target modules.** By default the ``nn.Linear`` layers inside the attention and MLP blocks of the
decoder layers (a numbered block whose path names ``attn``/``attention``/``mlp``/``ffn``/
``feed_forward``/``experts``), never embeddings or the LM head, and only matrices whose smaller side
exceeds ``rank`` (projecting a 576 x 8 router to rank 128 saves nothing). ``target_modules`` (a list of
regexes searched in the module names) overrides the rule.

**The first-step stall, and staggered refreshes.** Stock GaLore computes one full SVD per matrix at
step 0 and again every ``update_proj_gap`` steps, all at the same step: on a Llama-2-7B shape (224
matrices) the first step took more than 150 s on an H200. Our projector (an object galore-torch calls
through ``state["projector"]``, pre-populated so galore-torch never creates its own) does two things:

* ``init_proj_method="randomized"`` (default): the first projector of each matrix comes from a
  randomized range finder (Halko et al.: a Gaussian sketch with ``rank + oversample`` columns,
  ``power_iters`` QR-stabilised power iterations, then the SVD of the small ``k x n`` matrix), with its
  own seeded generator (the global RNG is untouched). Cost O(m n k) instead of O(m n min(m, n)).
* ``stagger=True`` (default): matrix ``i`` of ``N`` refreshes at the steps ``t > 0`` where
  ``(t + offset_i) % update_proj_gap == 0``, ``offset_i = i * gap // N``: each step after the first
  pays at most ``ceil(N / gap)`` refreshes instead of ``N`` every ``gap`` steps. Refreshes use
  ``proj_method`` (``svd``, exact as in galore-torch, or ``randomized``).

``stagger=False, proj_method="svd", init_proj_method="svd"`` with a numeric ``scale`` reproduces galore-torch's own
projector.

Measured on an H200 (``bench/results/techniques.md``, 8 Llama-2-7B layers = 56 matrices, 8-bit layer-wise,
seq 2048 x 4): the first step, with randomized initial projectors, took 1.46 s against 0.63 s for a plain
Trainer's first step; a later step that carried one exact SVD refresh (``proj_method="svd"``) took 1.30 s
against a 0.26 s median. Staggering spreads refreshes but does not make them cheaper: a full 7B (224
matrices, gap 200) averages ~1.1 exact refreshes per step, so prefer ``proj_method="randomized"`` there
(its effect on quality is not measured yet; the SmolLM2 quality run used the exact refresh).
``python -m hf_lowmem_plugins.galore`` measures SVD against the randomized finder on this machine.

**Layer-wise updates** (``*-layerwise``). Each trainable parameter gets its own inner optimizer, stepped
from a post-accumulate-grad hook, so a parameter's full gradient is freed as soon as it has been used and
the full gradients of the model never coexist. What the stock Trainer integration refuses, this does:

* *Gradient accumulation.* During an accumulation window the hooks do nothing and gradients accumulate
  in ``.grad`` as usual; on the window's last micro-batch (``accelerator.gradient_state.sync_gradients``,
  which the Trainer sets before each micro-batch) each hook updates its parameter once with the whole
  window's gradient and frees it. One update per window, exactly as the non-layer-wise optimizer.
  (With accumulation > 1 the window's gradients are therefore held in ``.grad`` until its last
  micro-batch: the memory saving of layer-wise updates is in the last backward and the optimizer step.)
* *Gradient clipping* (``max_grad_norm > 0``), exact. The global norm is only known when backward ends,
  and an Adam update cannot be rescaled after the fact. But GaLore's update depends on the full gradient
  only through its projection ``R = P^T G``, which is linear: on the last micro-batch each hook adds
  ``||G||^2`` to the window's norm, projects ``G`` to ``R`` (refreshing ``P`` from ``G`` when due; the
  singular vectors of ``c G`` and ``G`` are the same), keeps ``R`` (rank x n) and frees ``G``. When
  backward is over, ``optimizer.step()`` (called by the Trainer) computes
  ``c = min(1, max_grad_norm / (norm + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does and runs each
  parameter's inner step on ``c R``. Parameters that are not GaLore targets keep their (small: norms,
  embeddings, LM head) full gradient until then. The result equals clipping the full gradients first
  and then stepping, up to float rounding (tests/test_galore.py checks it to 2e-7 with fixed projectors);
  only low-rank gradients coexist. One rounding effect to know of: a projector refreshed in this window
  is computed from ``G`` where the normal path uses ``c G``; their singular vectors are equal in exact
  arithmetic but, where singular values nearly coincide, differ by ~1e-5 in float32.
* *DDP.* A per-parameter hook fires before DDP's bucketed all-reduce has produced the averaged gradient,
  so the hooks do the all-reduce themselves (sum, divided by the world size, as DDP averages) on the
  last micro-batch, and DDP's own gradient synchronisation is switched off on the wrapped model
  (``require_backward_grad_sync = False``, the flag ``no_sync()`` sets). DDP still allocates its bucket
  buffers. The same holds under clipping: norms are taken after the all-reduce, so every rank computes
  the same ``c``.

Not supported: FSDP and DeepSpeed (sharded or flattened parameters lose the 2-D shape GaLore projects;
the plugins declare the modes they support), fp16 with a gradient scaler for the layer-wise variants
(use bf16), and the ``stream`` weight-streaming engine (it brings its own optimizer).
``galore-adamw8bit`` needs a CUDA GPU: galore-torch's ``AdamW8bit.step`` calls
``torch.cuda.synchronize()`` for every parameter. Its bitsandbytes arguments are passed through an
explicit ``args`` object, because galore-torch 1.0 passes them positionally and with bitsandbytes >= 0.49
``percentile_clipping=100`` would land in ``max_unorm`` and ``block_wise=True`` in ``skip_zeros``.

(Over 400 lines because of this docstring, the plugins' reference: the code is ~360 lines.)
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from hf_lowmem import Plugin, anatomy, hookimpl
from hf_lowmem.errors import PluginError
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, measured_sentence, say_once
from hf_lowmem_plugins.lr_evidence import lr_message as evidence_message
from hf_lowmem_plugins.galore_layerwise import (
    STATE_KEY,
    LayerwiseOptimizer,
    _LayerwiseImpl,
    layerwise_callback,
    refuse_fp16,
)
from hf_lowmem_plugins.galore_projector import (PROJ_METHODS, GaLoreProjector, effective_method,  # noqa: F401
                                                top_singular_vectors)

logger = logging.getLogger("hf_lowmem.galore")

#: plugin name -> galore-torch class name
BASES = {"galore-adamw": "GaLoreAdamW", "galore-adamw8bit": "GaLoreAdamW8bit", "galore-adafactor": "GaLoreAdafactor"}
LAYERWISE = "-layerwise"
VARIANTS = {**{n: (c, False) for n, c in BASES.items()}, **{n + LAYERWISE: (c, True) for n, c in BASES.items()}}
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")

_AUTO_BLOCK = re.compile(r"(^|\.)\d+\.")
_AUTO_KIND = re.compile(r"attn|attention|mlp|ffn|feed_forward|experts?(\.|$)", re.IGNORECASE)


@dataclass
class GaLoreOptions:
    """Options of the GaLore plugins (``lowmem_options={"galore-adamw": {...}}``).

    :param rank: rank of the projected gradient (and of the optimizer state) of each target matrix.
    :param update_proj_gap: steps between two refreshes of a matrix's projector.
    :param scale: factor applied to the projected-back update (galore-torch's ``scale``, alpha): ``"auto"``
        (``sqrt(n / rank)`` per matrix, ``n`` the projected side: AdamW's step size at your learning rate) or a
        number (galore-torch's default was 0.25, which needs a several times larger learning rate).
    :param proj_type: ``std`` (project the smaller side), ``reverse_std``, ``left``, ``right``, ``full``.
    :param target_modules: regexes searched in module names; ``None`` picks the attention/MLP linears.
    :param stagger: spread projector refreshes over the ``update_proj_gap`` steps (see module docs).
    :param proj_method: how refreshes compute the subspace: ``svd`` (exact) or ``randomized``.
    :param init_proj_method: how the first projector of each matrix is computed (``randomized`` avoids
        the first-step stall; ``svd`` is galore-torch's behaviour).
    :param oversample: extra sketch columns of the randomized range finder.
    :param power_iters: power iterations of the randomized range finder.
    :param seed: seed of the randomized range finder (each matrix and refresh gets its own stream).
    :param min_8bit_size: ``galore-adamw8bit`` only: tensors with fewer elements keep 32-bit state.
    """

    rank: int = 128
    update_proj_gap: int = 200
    scale: Any = "auto"
    proj_type: str = "std"
    target_modules: list[str] | None = None
    stagger: bool = True
    proj_method: str = "svd"
    init_proj_method: str = "randomized"
    oversample: int = 8
    power_iters: int = 2
    seed: int = 0
    min_8bit_size: int = 4096

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ValueError(f"update_proj_gap must be a positive integer, got {self.update_proj_gap!r}")
        if self.scale != "auto" and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))
                                     or not self.scale > 0):
            raise ValueError(f"scale must be \"auto\" or a positive number, got {self.scale!r}")
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {', '.join(PROJ_TYPES)}, got {self.proj_type!r}")
        for name in ("proj_method", "init_proj_method"):
            if getattr(self, name) not in PROJ_METHODS:
                raise ValueError(f"{name} must be one of {', '.join(PROJ_METHODS)}, got {getattr(self, name)!r}")
        if self.oversample < 0 or self.power_iters < 0:
            raise ValueError("oversample and power_iters must be >= 0")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            if not isinstance(self.target_modules, (list, tuple)) or not all(isinstance(x, str) for x in self.target_modules):
                raise ValueError(f"target_modules must be a list of regular expressions, got {self.target_modules!r}")
            for rx in self.target_modules:
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"target_modules: {rx!r} is not a valid regular expression ({e})") from e
            self.target_modules = list(self.target_modules)


# ------------------------------------------------------------------------------------------------
# registration and validation
# ------------------------------------------------------------------------------------------------

#: what bench/quality.py measured (bench/results/quality_gpu.md), per measured variant: with scale "auto" (the
#: default; rank 128) and with galore-torch's fixed 0.25, keyed by its value (measured at the default rank only).
#: galore-adafactor shares galore-adamw's numbers (same projection and scale), the layer-wise variants those of
#: their normal variant (the same updates).
EVIDENCE = {
    "galore-adamw": {
        "auto": Evidence((Measured(-7.30, 1, -7.30, PRETRAIN), Measured(0.34, 2, -0.30, FINETUNE)), "galore-adamw"),
        0.25: Evidence((Measured(14.46, 8, -9.63, PRETRAIN), Measured(3.41, 8, 1.46, FINETUNE)),
                       "galore-adamw-s025", measured_as="galore-adamw with rank 128 and galore-torch's scale 0.25"),
    },
    "galore-adamw8bit": {
        "auto": Evidence((Measured(-8.37, 1, -8.37, PRETRAIN), Measured(0.38, 2, -0.25, FINETUNE)), "galore-adamw8bit"),
    },
}


def _base(name: str) -> str:
    """The variant without its ``-layerwise`` suffix."""
    return name[: -len(LAYERWISE)] if name.endswith(LAYERWISE) else name


def evidence(base: str, scale) -> Evidence | None:
    """The measurement of GaLore variant ``base`` (no ``-layerwise``) at ``scale`` ("auto" or a number): its own,
    else galore-adamw's; ``None`` where none was made."""
    return EVIDENCE.get(base, {}).get(scale) or EVIDENCE["galore-adamw"].get(scale)


def lr_message(name: str, opts: GaLoreOptions, lr: float) -> tuple[int, str]:
    """(logging level, text) logged once at construction: how the step relates to AdamW's at ``lr``, the numbers."""
    if opts.scale == "auto":
        why = ("scale=\"auto\": each target matrix's projected-back update is scaled by sqrt(n / rank) (n the "
               "projected side), so its RMS is about AdamW's at the same learning rate")
        return evidence_message(name, evidence(_base(name), "auto"), lr, why)
    r576, r4096 = (float(opts.scale) * math.sqrt(min(opts.rank, n) / n) for n in (576, 4096))
    text = (f"{name}: fixed scale={opts.scale:g} with rank {opts.rank}: the update's RMS is scale * sqrt(rank / n) "
            f"times AdamW's at the same learning rate (n the projected side: {r576:.2f}x for n=576, {r4096:.2f}x for "
            f"n=4096), so at your AdamW learning rate ({lr:g}) it takes smaller steps. Raise learning_rate by about "
            "1/ratio, or use scale=\"auto\" (the default), which matches AdamW's step at your learning rate")
    measured = evidence(_base(name), float(opts.scale)) if opts.rank == GaLoreOptions.rank else None
    if measured is not None:
        text += f"; {measured_sentence(measured)}"
    return logging.WARNING, text


_STREAM_REASON = ("GaLore projects each weight's full gradient inside the optimizer; the stream engine brings its own "
                  "optimizer and never hands the Trainer one. Use GaLore without stream, or stream with its optimizer")


class GaLorePlugin(Plugin):
    """One GaLore variant: ``cls_name`` of galore-torch, updated layer by layer inside backward or not."""

    kind, extra, options, lossless, modes = "optimizer", "galore", GaLoreOptions, False, ("single", "ddp")
    incompatible = {"stream": _STREAM_REASON}

    def __init__(self, name: str, cls_name: str, layerwise: bool):
        base = _base(name)
        what = {"galore-adamw": "AdamW", "galore-adamw8bit": "8-bit AdamW", "galore-adafactor": "Adafactor"}[base]
        help_ = (f"GaLore low-rank gradient projection with {what} (galore-torch {cls_name}); default scale \"auto\" "
                 "= sqrt(n/rank) per matrix (galore-torch's is 0.25) keeps AdamW's step size at your lr")
        if layerwise:
            help_ += "; updated layer by layer inside backward (works with accumulation, clipping, DDP)"
        eight = "8bit" in name
        # bitsandbytes first: galore_torch imports it, so a missing one would otherwise be reported as galore_torch;
        # the extras named are the two that install both
        super().__init__(name=name, help=help_, requires=("bitsandbytes", "galore_torch") if eight else ("galore_torch",),
                         extra="galore,bnb" if eight else "galore", needs_cuda=eight,
                         quality_gap=evidence(base, "auto").gap_pct, lr_advice=advice(evidence(base, "auto"), name))
        self.cls_name, self.layerwise = cls_name, layerwise

    def validate(self, ctx):
        if self.layerwise:
            refuse_fp16(self.name, ctx.args)
        say_once(logger, *lr_message(self.name, ctx.options(self.name), ctx.args.learning_rate))

    def callbacks(self, ctx):
        if not self.layerwise:
            return []
        return [layerwise_callback(lambda: (ctx.state.get(STATE_KEY) or {}).get("optimizer"))]

    def create_optimizer(self, ctx, model, trainer):
        return create_optimizer(self, ctx, model, trainer)

    def memory_model(self, plan, st):
        from hf_lowmem.planner import PlanRefused

        opts = self.options_for(plan)
        if opts.target_modules is None and not any(min(r, c) > opts.rank for _, (r, c) in plan.shape.layer_matrices):
            raise PlanRefused(f"{self.name}: no projection has both sides larger than rank {opts.rank}")
        states, proj, svd_s, low = _galore_parts(plan, opts, eight="8bit" in self.name,
                                                 adafactor="adafactor" in self.name)
        st.states = states + proj
        pb = plan.setup.param_bytes
        big = max((r * c for _, (r, c) in plan.shape.layer_matrices), default=0)
        # the step of one matrix: its fp32 gradient copy, the projected gradient and the projected-back update
        st.opt_ws = big * 4 + big * pb
        st.opt_bytes_per_param = 3 * pb + 2
        st.opt_kernel_factor = 3.0
        st.opt_extra_seconds = svd_s
        if self.layerwise:
            if plan.setup.grad_accum > 1:
                st.notes.append(f"{self.name} with gradient accumulation keeps the window's full gradients until its "
                                "last micro-batch (the saving is in the last backward and the step)")
            st.grad_free_per_param = True  # in the last micro-batch; earlier ones are counted by the replay
            st.states += low  # projected gradients kept for the clipped step


def _galore_parts(plan, opts: GaLoreOptions, eight: bool, adafactor: bool) -> tuple[float, float, float, float]:
    """(state bytes, projector bytes, SVD seconds per step amortised, low-rank gradient bytes) of a plan."""
    from hf_lowmem.planner import bnb8_state_bytes

    sh, su = plan.shape, plan.setup
    rank, gap = opts.rank, opts.update_proj_gap
    states = proj = svd_s = low = 0.0
    for _ in range(sh.n_layers):
        for _n, (r, c) in sh.layer_matrices:
            if min(r, c) <= rank:  # not a target: full-rank state
                states += bnb8_state_bytes(r * c) if eight else (4 * (r + c) if adafactor else 8 * r * c)
                continue
            n_low = rank * max(r, c)
            low += n_low * su.param_bytes
            proj += rank * min(r, c) * su.param_bytes
            states += bnb8_state_bytes(n_low) if eight else (4 * (rank + max(r, c)) if adafactor else 8 * n_low)
            # one SVD-class refresh per matrix every `gap` steps (randomized: ~ m n k instead of m n min(m, n))
            svd_s += (r * c * (rank + 8) * 3.6e-12 * 40) / gap
    rest = sh.embed_params + sh.head_params + sh.other_params + sh.n_layers * (sh.layer_params[0] - sh.linear_layer_params)
    states += bnb8_state_bytes(int(rest)) if eight else 8.0 * rest
    return states, proj, svd_s, low


@hookimpl
def hf_lowmem_register(register):
    for name, (cls_name, layerwise) in VARIANTS.items():
        register(GaLorePlugin(name, cls_name, layerwise))


# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# target selection and parameter groups
# ------------------------------------------------------------------------------------------------

def select_targets(model, opts: GaLoreOptions, plugin: str = "galore") -> list[tuple[str, Any]]:
    """``(module name, nn.Linear)`` pairs whose weights GaLore projects, in model order."""
    import torch.nn as nn

    out_emb, in_emb = anatomy.lm_head(model), anatomy.embeddings(model)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and m.weight is not None and m.weight.requires_grad and m.weight.dim() == 2]
    if opts.target_modules is not None:
        rx = [re.compile(x) for x in opts.target_modules]
        chosen = [(n, m) for n, m in linears if any(r.search(n) for r in rx)]
        if not chosen:
            sample = ", ".join(n for n, _ in linears[:8]) or "none"
            raise PluginError(f"plugin {plugin!r}: target_modules {opts.target_modules} match no trainable nn.Linear "
                              f"module; module names look like: {sample}")
        return chosen
    chosen, skipped = [], []
    for n, m in linears:
        if m is out_emb or m is in_emb or m.weight is getattr(out_emb, "weight", None):
            continue
        if not (_AUTO_BLOCK.search(n) and _AUTO_KIND.search(n)):
            continue
        if min(m.weight.shape) <= opts.rank:
            skipped.append(n)
            continue
        chosen.append((n, m))
    if skipped:
        logger.info("%s: %d linear layer(s) have a side <= rank %d and stay full-rank (e.g. %s)",
                    plugin, len(skipped), opts.rank, skipped[0])
    if not chosen:
        sample = ", ".join(n for n, _ in linears[:8]) or "none"
        raise PluginError(
            f"plugin {plugin!r} found no attention/MLP nn.Linear layer inside the decoder blocks with both sides "
            f"larger than rank={opts.rank}. Lower the rank, or name the layers with the option target_modules "
            f"(regexes), e.g. {{\"target_modules\": [\"attn\", \"mlp\"]}}. Linear layers here: {sample}"
        )
    return chosen


def galore_param_groups(trainer, model, opts: GaLoreOptions, targets) -> list[dict]:
    """The Trainer's weight-decay split, crossed with GaLore target / not target; GaLore groups carry
    galore-torch's keys (rank, update_proj_gap, scale, proj_type). Empty groups are dropped."""
    decay = set(trainer.get_decay_parameter_names(model))
    target_ids = {id(m.weight) for _, m in targets}
    wd = trainer.args.weight_decay
    buckets: dict[tuple[bool, bool], list] = {(g, d): [] for g in (True, False) for d in (True, False)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            buckets[(id(p) in target_ids, n in decay)].append(p)
    groups = []
    for (is_target, has_decay), params in buckets.items():
        if not params:
            continue
        group = {"params": params, "weight_decay": wd if has_decay else 0.0}
        if is_target:
            group.update(rank=opts.rank, update_proj_gap=opts.update_proj_gap, scale=opts.scale, proj_type=opts.proj_type)
        groups.append(group)
    return groups


def matrix_scale(shape, opts: GaLoreOptions) -> float:
    """The ``scale`` of a target matrix of ``shape``: under ``"auto"``, ``sqrt(n / rank)`` with ``n`` the side the
    projector reduces to ``rank`` (``sqrt(m n) / rank`` for ``full``, which reduces both)."""
    if opts.scale != "auto":
        return float(opts.scale)
    m, n = shape
    if opts.proj_type == "full":
        return math.sqrt(m * n) / min(opts.rank, m, n)
    side = {"std": min(m, n), "reverse_std": max(m, n), "left": m, "right": n}[opts.proj_type]
    return math.sqrt(side / min(opts.rank, side))


def make_projectors(targets, opts: GaLoreOptions) -> dict:
    """One :class:`GaLoreProjector` per target weight, with staggered refresh offsets."""
    n = len(targets)
    out = {}
    for i, (name, m) in enumerate(targets):
        offset = (i * opts.update_proj_gap) // n if opts.stagger else 0
        out[m.weight] = GaLoreProjector(opts.rank, opts.update_proj_gap, matrix_scale(m.weight.shape, opts),
                                        opts.proj_type, opts.proj_method,
                                        opts.init_proj_method, offset=offset, oversample=opts.oversample,
                                        power_iters=opts.power_iters, seed=opts.seed, index=i, name=f"{name}.weight")
    return out


# ------------------------------------------------------------------------------------------------
# building galore-torch optimizers
# ------------------------------------------------------------------------------------------------

def _build(cls_name: str, groups: list[dict], args, opts: GaLoreOptions):
    import galore_torch

    cls = getattr(galore_torch, cls_name)
    lr = args.learning_rate
    if cls_name == "GaLoreAdamW":
        return cls(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                   weight_decay=args.weight_decay, no_deprecation_warning=True)
    if cls_name == "GaLoreAdamW8bit":
        from types import SimpleNamespace

        # galore-torch 1.0 passes bitsandbytes' arguments positionally, which bitsandbytes >= 0.49 reads as
        # max_unorm=100, skip_zeros=True; an explicit args object is read by name by every version.
        bnb_args = SimpleNamespace(optim_bits=8, min_8bit_size=opts.min_8bit_size, percentile_clipping=100,
                                   block_wise=True, max_unorm=0.0, skip_zeros=False)
        return cls(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                   weight_decay=args.weight_decay, args=bnb_args)
    if cls_name == "GaLoreAdafactor":
        # fine-tuning settings: the Trainer's learning rate and schedule, no relative steps
        return cls(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                   weight_decay=args.weight_decay)
    raise PluginError(f"unknown galore-torch optimizer {cls_name}")


def _install_projectors(optimizer, projectors: dict) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p in projectors:
                optimizer.state[p]["projector"] = projectors[p]


def _register_safe_globals() -> None:
    import torch

    torch.serialization.add_safe_globals([GaLoreProjector])


def create_optimizer(plugin: GaLorePlugin, ctx, model, trainer):
    """The optimizer of the GaLore variant ``plugin``: its own parameter groups (GaLore targets carry
    galore-torch's keys) and projectors, layer-wise or not."""
    name = plugin.name
    opts = ctx.options(name)
    targets = select_targets(model, opts, name)
    groups = galore_param_groups(trainer, model, opts, targets)
    projectors = make_projectors(targets, opts)
    _register_safe_globals()
    if plugin.layerwise:
        opt = LayerwiseOptimizer(groups, lambda gs: _build(plugin.cls_name, gs, ctx.args, opts), projectors,
                                 trainer=trainer, max_grad_norm=ctx.args.max_grad_norm, plugin=name)
    else:
        opt = _build(plugin.cls_name, groups, ctx.args, opts)
        _install_projectors(opt, projectors)
    ctx.state[STATE_KEY] = {"optimizer": opt, "targets": [n for n, _ in targets], "plugin": name}
    logger.info("%s: %d target matrices (rank %d, gap %d, stagger %s), %d parameter groups", name, len(targets),
                opts.rank, opts.update_proj_gap, opts.stagger, len(groups))
    return opt


def projectors_of(optimizer) -> list[GaLoreProjector]:
    """Every projector an optimizer built by these plugins holds, in parameter order (for tests/benchmarks)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    inners = list(opt.inner.values()) if isinstance(opt, _LayerwiseImpl) else [opt]
    out = []
    for o in inners:
        for g in o.param_groups:
            for p in g["params"]:
                pr = o.state.get(p, {}).get("projector")
                if isinstance(pr, GaLoreProjector):
                    out.append(pr)
    return out


# ------------------------------------------------------------------------------------------------


if __name__ == "__main__":  # python -m hf_lowmem_plugins.galore: the projector cost (see galore_projector)
    from hf_lowmem_plugins.galore_projector import _main

    raise SystemExit(_main())
