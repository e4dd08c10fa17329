"""GaLore optimizers (the ``galore-torch`` package) as hf-lowmem plugins, including layer-wise updates.

Plugins: ``galore-adamw``, ``galore-adamw8bit``, ``galore-adafactor`` and their layer-wise variants
``galore-adamw-layerwise``, ``galore-adamw8bit-layerwise``, ``galore-adafactor-layerwise``.

GaLore (Zhao et al., 2024) keeps the optimizer state of a weight matrix ``W`` (m x n) in a rank-``r``
subspace: the gradient ``G`` is projected to ``R = G P^T`` (or ``P^T G``), the inner optimizer (AdamW,
8-bit AdamW, Adafactor from galore-torch) updates on ``R``, and the update is projected back and scaled.
``P`` comes from the SVD of the gradient and is refreshed every ``update_proj_gap`` steps. Parameters
that are not GaLore targets (embeddings, norms, the LM head) get the same optimizer at full rank.

What this module adds to galore-torch (its optimizers do the arithmetic; the glue here is our own):

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

``stagger=False, proj_method="svd", init_proj_method="svd"`` reproduces galore-torch's own projector.

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
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from hf_lowmem import hookimpl
from hf_lowmem.errors import PluginError
from hf_lowmem.registry import PluginInfo

logger = logging.getLogger("hf_lowmem.galore")

#: plugin name -> galore-torch class name
BASES = {"galore-adamw": "GaLoreAdamW", "galore-adamw8bit": "GaLoreAdamW8bit", "galore-adafactor": "GaLoreAdafactor"}
LAYERWISE = "-layerwise"
VARIANTS = {**{n: (c, False) for n, c in BASES.items()}, **{n + LAYERWISE: (c, True) for n, c in BASES.items()}}
PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
PROJ_METHODS = ("svd", "randomized")
STATE_KEY = "galore"  # ctx.state[STATE_KEY]: what the create_optimizer hook built (for callbacks and tests)

_AUTO_BLOCK = re.compile(r"(^|\.)\d+\.")
_AUTO_KIND = re.compile(r"attn|attention|mlp|ffn|feed_forward|experts?(\.|$)", re.IGNORECASE)


@dataclass
class GaLoreOptions:
    """Options of the GaLore plugins (``lowmem_options={"galore-adamw": {...}}``).

    :param rank: rank of the projected gradient (and of the optimizer state) of each target matrix.
    :param update_proj_gap: steps between two refreshes of a matrix's projector.
    :param scale: factor applied to the projected-back update (galore-torch's ``scale``, alpha).
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
    scale: float = 0.25
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
        if not isinstance(self.scale, (int, float)) or self.scale <= 0:
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
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

_STREAM_REASON = ("GaLore projects each weight's full gradient inside the optimizer; the stream engine brings its own "
                  "optimizer and never hands the Trainer one. Use GaLore without stream, or stream with its optimizer")


@hookimpl
def hf_lowmem_register(register):
    for name, (cls, layerwise) in VARIANTS.items():
        base = name[: -len(LAYERWISE)] if layerwise else name
        what = {"galore-adamw": "AdamW", "galore-adamw8bit": "8-bit AdamW", "galore-adafactor": "Adafactor"}[base]
        help_ = f"GaLore low-rank gradient projection with {what} (galore-torch {cls})"
        if layerwise:
            help_ += "; updated layer by layer inside backward (works with accumulation, clipping, DDP)"
        register(PluginInfo(
            name=name, kind="optimizer", help=help_,
            requires=("galore_torch", "bitsandbytes") if "8bit" in name else ("galore_torch",),
            extra="galore", options=GaLoreOptions, lossless=False,
            modes=("single", "ddp"),
            incompatible={"stream": _STREAM_REASON},
            needs_cuda="8bit" in name,
        ))


def _is_galore(ctx) -> str | None:
    name = ctx.selected("optimizer")
    return name if name in VARIANTS else None


@hookimpl
def hf_lowmem_validate(ctx):
    name = _is_galore(ctx)
    if name is None:
        return
    if VARIANTS[name][1]:
        import torch

        if not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"):
            raise PluginError(f"plugin {name!r} needs torch >= 2.1 (post-accumulate-grad hooks); upgrade torch")
        if getattr(ctx.args, "fp16", False):
            raise PluginError(f"plugin {name!r} updates parameters inside backward, before a fp16 gradient scaler "
                              "could unscale and check the gradients: train with bf16=True (or fp32) instead of fp16")


@hookimpl
def hf_lowmem_callbacks(ctx):
    if _is_galore(ctx) is None or not VARIANTS[_is_galore(ctx)][1]:
        return None
    return [_layerwise_callback(ctx)]


# ------------------------------------------------------------------------------------------------
# the projector galore-torch calls through state["projector"]
# ------------------------------------------------------------------------------------------------

class GaLoreProjector:
    """Projects a gradient matrix to rank ``rank`` and back; galore-torch's optimizers call
    :meth:`project` and :meth:`project_back`. Holds only tensors, numbers and strings, so it survives
    ``torch.load(weights_only=True)`` (the class is registered as a safe global).

    ``t`` counts the projections computed (one per optimizer step). A refresh is due when there is no
    basis yet or when ``t > 0`` and ``(t + offset) % gap == 0``. ``refreshes`` records ``(t, method)``.
    ``pending``, when set, is returned by the next :meth:`project` call instead of a new projection (the
    layer-wise clipping path projects inside backward and steps after it).
    """

    def __init__(self, rank: int, gap: int, scale: float, proj_type: str, method: str, init_method: str,
                 offset: int = 0, oversample: int = 8, power_iters: int = 2, seed: int = 0, index: int = 0):
        self.rank, self.gap, self.scale, self.proj_type = rank, gap, float(scale), proj_type
        self.method, self.init_method = method, init_method
        self.offset, self.oversample, self.power_iters, self.seed, self.index = offset, oversample, power_iters, seed, index
        self.t = 0
        self.side: str | None = None  # "left", "right" or "full"
        self.basis = None  # left: U (m x r); right: Vh (r x n); full: U
        self.basis2 = None  # full: Vh
        self.pending = None
        self.refreshes: list[tuple[int, str]] = []

    # -- what galore-torch calls ------------------------------------------------------------------------
    def project(self, full_rank_grad, iter=None):  # noqa: A002 - galore-torch's parameter name
        if self.pending is not None:
            low, self.pending = self.pending, None
            return low
        g = full_rank_grad
        if self.due():
            self.refresh(g)
        self.t += 1
        return self.down(g)

    def project_back(self, low_rank_grad):
        import torch

        if self.side == "right":
            full = torch.matmul(low_rank_grad, self.basis)
        elif self.side == "left":
            full = torch.matmul(self.basis, low_rank_grad)
        else:
            full = torch.matmul(self.basis, low_rank_grad) @ self.basis2
        return full * self.scale

    # -- ours ---------------------------------------------------------------------------------------------
    def due(self) -> bool:
        return self.basis is None or (self.t > 0 and (self.t + self.offset) % self.gap == 0)

    def down(self, g):
        import torch

        if self.side == "right":
            return torch.matmul(g, self.basis.t())
        if self.side == "left":
            return torch.matmul(self.basis.t(), g)
        return torch.matmul(self.basis.t(), g) @ self.basis2.t()

    def _side_for(self, shape) -> str:
        m, n = shape
        if self.proj_type == "std":
            return "right" if m >= n else "left"
        if self.proj_type == "reverse_std":
            return "left" if m >= n else "right"
        return self.proj_type

    def refresh(self, g) -> None:
        method = effective_method(self.init_method if self.basis is None else self.method, self.rank, g.shape,
                                  self.oversample)
        self.side = self._side_for(g.shape)
        u, vh = top_singular_vectors(g, self.rank, method, want=self.side, oversample=self.oversample,
                                     power_iters=self.power_iters, seed=(self.seed, self.index, self.t))
        if self.side == "right":
            self.basis, self.basis2 = vh.to(g.dtype), None
        elif self.side == "left":
            self.basis, self.basis2 = u.to(g.dtype), None
        else:
            self.basis, self.basis2 = u.to(g.dtype), vh.to(g.dtype)
        self.refreshes.append((self.t, method))


def effective_method(method: str, rank: int, shape, oversample: int) -> str:
    """The method :func:`top_singular_vectors` really uses: ``randomized`` falls back to the exact ``svd``
    when its sketch (``min(rank, m, n) + oversample`` columns) is wider than half the matrix's smaller side,
    where sketching saves nothing."""
    m, n = shape
    return "svd" if method == "svd" or 2 * (min(rank, m, n) + oversample) > min(m, n) else method


def top_singular_vectors(g, rank: int, method: str, want: str = "full", oversample: int = 8, power_iters: int = 2,
                         seed: tuple = (0,)):
    """The top-``rank`` left singular vectors ``U`` (m x r) and right ones ``Vh`` (r x n) of ``g``, in fp32.

    ``method="svd"``: ``torch.linalg.svd`` (both sides). ``method="randomized"``: a randomized range finder
    with a private generator seeded from ``seed``, computing only the side ``want`` asks for (``"left"``:
    returns ``(U, None)``; ``"right"``: ``(None, Vh)``; ``"full"``: both). The finder sketches the range of
    ``a`` (``g``, or ``g^T`` for the right side) with ``k = rank + oversample`` Gaussian columns, runs
    ``power_iters`` QR-stabilised power iterations, then takes the top eigenvectors of the k x k Gram matrix
    ``B B^T`` of ``B = Q^T a`` (an ``eigh`` of k x k: on CPU, torch's SVD of the thin k x n matrix was up to
    30x slower). Falls back to the exact SVD when ``2 k > min(m, n)``, where sketching saves nothing.
    """
    import torch

    a = g.detach().float()
    m, n = a.shape
    r = min(rank, m, n)
    k = r + oversample
    if effective_method(method, rank, (m, n), oversample) == "svd":
        u, _, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :r], vh[:r]
    gen = torch.Generator(device=a.device)
    gen.manual_seed(_mix_seed(seed))
    sides = ("left", "right") if want == "full" else (want,)
    out = {}
    for side in sides:
        x = a.t() if side == "right" else a  # the wanted vectors are the left singular vectors of x
        omega = torch.randn(x.shape[1], k, generator=gen, device=x.device, dtype=x.dtype)
        q = torch.linalg.qr(x @ omega).Q
        for _ in range(power_iters):
            q = torch.linalg.qr(x.t() @ q).Q
            q = torch.linalg.qr(x @ q).Q
        b = q.t() @ x
        _, evecs = torch.linalg.eigh(b @ b.t())  # ascending eigenvalues sigma^2
        out[side] = q @ evecs[:, -r:].flip(-1)
    u = out.get("left")
    vh = out["right"].t() if "right" in out else None
    return u, vh


def _mix_seed(parts) -> int:
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (int(x) & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


# ------------------------------------------------------------------------------------------------
# target selection and parameter groups
# ------------------------------------------------------------------------------------------------

def select_targets(model, opts: GaLoreOptions, plugin: str = "galore") -> list[tuple[str, Any]]:
    """``(module name, nn.Linear)`` pairs whose weights GaLore projects, in model order."""
    import torch.nn as nn

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
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


def make_projectors(targets, opts: GaLoreOptions) -> dict:
    """One :class:`GaLoreProjector` per target weight, with staggered refresh offsets."""
    n = len(targets)
    out = {}
    for i, (_, m) in enumerate(targets):
        offset = (i * opts.update_proj_gap) // n if opts.stagger else 0
        out[m.weight] = GaLoreProjector(opts.rank, opts.update_proj_gap, opts.scale, opts.proj_type, opts.proj_method,
                                        opts.init_proj_method, offset=offset, oversample=opts.oversample,
                                        power_iters=opts.power_iters, seed=opts.seed, index=i)
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

    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([GaLoreProjector])


@hookimpl
def hf_lowmem_create_optimizer(ctx, model, trainer):
    name = _is_galore(ctx)
    if name is None:
        return None
    info = ctx.info(name)
    info.import_requirements()
    cls_name, layerwise = VARIANTS[name]
    opts = ctx.options(name) or GaLoreOptions()
    targets = select_targets(model, opts, name)
    groups = galore_param_groups(trainer, model, opts, targets)
    projectors = make_projectors(targets, opts)
    _register_safe_globals()
    if layerwise:
        opt = LayerwiseOptimizer(groups, lambda gs: _build(cls_name, gs, ctx.args, opts), projectors,
                                 trainer=trainer, max_grad_norm=ctx.args.max_grad_norm, plugin=name)
    else:
        opt = _build(cls_name, groups, ctx.args, opts)
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
# layer-wise
# ------------------------------------------------------------------------------------------------

_LAYERWISE_CLASS = None


def LayerwiseOptimizer(*args, **kwargs):  # noqa: N802 - behaves as the class
    """Build a layer-wise optimizer: a ``torch.optim.Optimizer`` subclass of :class:`_LayerwiseImpl`,
    created on first use so that importing this module does not import torch."""
    global _LAYERWISE_CLASS
    if _LAYERWISE_CLASS is None:
        import torch

        _LAYERWISE_CLASS = type("LayerwiseOptimizer", (_LayerwiseImpl, torch.optim.Optimizer),
                                {"__module__": __name__, "__doc__": _LayerwiseImpl.__doc__})
    return _LAYERWISE_CLASS(*args, **kwargs)


class _LayerwiseImpl:
    """A facade optimizer over one galore-torch optimizer per parameter, stepped from post-accumulate-grad
    hooks (see the module docstring for accumulation, clipping and DDP). Its ``param_groups`` are the
    inner optimizers' own group dicts, so the Trainer's LR scheduler drives them directly; ``step()`` is
    called by the Trainer once per window and runs the deferred (clipped) updates, if any."""

    def __init__(self, groups, build, projectors, trainer=None, max_grad_norm=0.0, plugin="galore-layerwise"):
        import torch

        self.plugin = plugin
        self.trainer = trainer
        self.max_grad_norm = float(max_grad_norm or 0.0)
        self.inner: dict = {}
        for group in groups:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.inner[p] = build([{"params": [p], **hyper}])
        for p, pr in projectors.items():
            self.inner[p].state[p]["projector"] = pr
        torch.optim.Optimizer.__init__(self, [{"params": [p]} for p in self.inner], {})
        self.param_groups = [o.param_groups[0] for o in self.inner.values()]
        self._handles: list = []
        self._ddp = None
        self._world = 1
        self.last_grad_norm: float | None = None
        self._reset_window()

    # -- hooks ------------------------------------------------------------------------------------------
    def attach(self, wrapped_model=None) -> None:
        """Register the per-parameter hooks (idempotent); under DDP, take over gradient synchronisation."""
        import torch.distributed as dist

        if not self._handles:
            self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.inner]
        self._world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        ddp = _find_ddp(wrapped_model)
        if ddp is not None:
            ddp.require_backward_grad_sync = False  # what no_sync() sets: DDP's reducer stays idle
            self._ddp = ddp

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._ddp is not None:
            self._ddp.require_backward_grad_sync = True
            self._ddp = None

    def _syncing(self) -> bool:
        if self.trainer is None:
            return True
        return bool(self.trainer.accelerator.gradient_state.sync_gradients)

    def _reset_window(self) -> None:
        self._sq = None
        self._consumed = 0
        self._deferred: list = []
        self._held: dict = {}

    def _on_grad(self, p) -> None:
        import torch

        if not self._syncing():
            return  # inside an accumulation window: let .grad accumulate
        with torch.no_grad():
            g = p.grad
            if g is None:
                return
            if self._world > 1:
                import torch.distributed as dist

                dist.all_reduce(g)
                g.div_(self._world)
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()
            self._sq = sq if self._sq is None else self._sq + sq.to(self._sq.device)
            self._consumed += 1
            opt = self.inner[p]
            if self.max_grad_norm > 0:
                pr = opt.state[p].get("projector")
                if isinstance(pr, GaLoreProjector):
                    pr.pending = pr.project(g)
                else:
                    self._held[p] = g
                p.grad = None
                self._deferred.append(p)
            else:
                opt.step()
                p.grad = None

    # -- the Optimizer interface the Trainer uses ------------------------------------------------------------
    def step(self, closure=None):
        import torch

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._consumed == 0 and any(p.grad is not None for p in self.inner):
            raise PluginError(
                f"{self.plugin}: gradients were accumulated but no hook saw the last micro-batch of the window "
                "(accelerator.gradient_state.sync_gradients was never True during backward), so nothing was updated. "
                "The layer-wise optimizer must be stepped by hf_lowmem's LowMemTrainer, or by a loop that sets "
                "sync_gradients on the last micro-batch (accelerator.accumulate does)."
            )
        norm = math.sqrt(float(self._sq)) if self._sq is not None else 0.0
        if self._deferred:
            coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
            with torch.no_grad():
                for p in self._deferred:
                    opt = self.inner[p]
                    pr = opt.state[p].get("projector")
                    if p in self._held:
                        g = self._held.pop(p)
                        if coef < 1.0:
                            g.mul_(coef)
                        p.grad = g
                    else:
                        if coef < 1.0:
                            pr.pending.mul_(coef)
                        # galore-torch skips parameters without .grad and hands .grad to the projector, which
                        # returns the pending low-rank gradient: a zero-stride placeholder costs no memory.
                        p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand_as(p)
                    opt.step()
                    p.grad = None
        if self._consumed:
            self.last_grad_norm = norm
        self._reset_window()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self.inner:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return {"layerwise": [o.state_dict() for o in self.inner.values()]}

    def load_state_dict(self, state_dict):
        saved = state_dict.get("layerwise")
        if saved is None or len(saved) != len(self.inner):
            raise PluginError(f"{self.plugin}: the optimizer state does not come from the same layer-wise optimizer "
                              f"({len(saved or [])} saved parameters, {len(self.inner)} here)")
        for (p, o), sd in zip(self.inner.items(), saved):
            o.load_state_dict(sd)
        self.param_groups = [o.param_groups[0] for o in self.inner.values()]


def _find_ddp(model):
    if model is None:
        return None
    from torch.nn.parallel import DistributedDataParallel

    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, DistributedDataParallel):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


def _layerwise_callback(ctx):
    from transformers import TrainerCallback

    class GaLoreLayerwiseCallback(TrainerCallback):
        """Attaches the layer-wise hooks for the length of ``train()`` and reports the real gradient norm."""

        def _opt(self):
            built = ctx.state.get(STATE_KEY)
            return built["optimizer"] if built else None

        def on_train_begin(self, args, state, control, **kw):
            opt = self._opt()
            if opt is not None:
                opt.attach(getattr(opt.trainer, "model_wrapped", None))

        def on_train_end(self, args, state, control, **kw):
            opt = self._opt()
            if opt is not None:
                opt.detach()

        def on_log(self, args, state, control, logs=None, **kw):
            # The Trainer measures the norm after backward, when the layer-wise hooks have freed every gradient.
            opt = self._opt()
            if opt is None or opt.last_grad_norm is None or not logs or "grad_norm" not in logs:
                return
            logs["grad_norm"] = opt.last_grad_norm
            if state.log_history and "grad_norm" in state.log_history[-1]:
                state.log_history[-1]["grad_norm"] = opt.last_grad_norm

    return GaLoreLayerwiseCallback()


# ------------------------------------------------------------------------------------------------
# measuring the projector cost: python -m hf_lowmem_plugins.galore [--threads N]
# ------------------------------------------------------------------------------------------------

def measure_projection_cost(shapes=((512, 512), (1024, 1024), (1024, 2816), (2048, 2048)), rank_frac=0.25,
                            repeats=3, oversample=8, power_iters=2) -> list[dict]:
    """Time (best of ``repeats``, after a warm-up) one full SVD and one randomized range finder (the left
    basis, as for a wide matrix) per shape (fp32, this machine's default device and threads), and how much of the gradient's top-r energy the randomized basis captures on a matrix
    with a decaying spectrum (singular values 1/(1+i)^0.5 plus noise, like a gradient's)."""
    import torch

    rows = []
    for m, n in shapes:
        r = max(1, int(min(m, n) * rank_frac))
        gen = torch.Generator().manual_seed(0)
        k = min(m, n)
        u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
        s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32).sqrt()
        g = (u * s) @ v.t() + 1e-3 * torch.randn(m, n, generator=gen)
        times = {}
        for method in PROJ_METHODS:
            top_singular_vectors(g, r, method, want="left", seed=(0,))  # warm-up (first calls initialise LAPACK)
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                uu, vh = top_singular_vectors(g, r, method, want="left", oversample=oversample,
                                              power_iters=power_iters, seed=(1,))
                best = min(best, time.perf_counter() - t0)
            times[method] = best
            if method == "svd":
                exact = uu
            else:
                approx = uu
        energy = float((approx.t() @ g).square().sum() / (exact.t() @ g).square().sum())
        rows.append({"shape": (m, n), "rank": r, "svd_s": times["svd"], "randomized_s": times["randomized"],
                     "speedup": times["svd"] / times["randomized"], "energy_captured": energy})
    return rows


def _main(argv=None) -> int:
    import argparse

    import torch

    ap = argparse.ArgumentParser(prog="python -m hf_lowmem_plugins.galore",
                                 description="Measure the cost of one GaLore projector refresh per matrix shape.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rank-frac", type=float, default=0.25)
    ap.add_argument("--shapes", default="512x512,1024x1024,1024x2816,2048x2048")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, rank = {a.rank_frac} x min side")
    print("| shape | rank | full SVD (s) | randomized (s) | speed-up | top-r energy captured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in measure_projection_cost(shapes, a.rank_frac):
        print(f"| {row['shape'][0]}x{row['shape'][1]} | {row['rank']} | {row['svd_s']:.3f} | {row['randomized_s']:.3f} | "
              f"{row['speedup']:.1f}x | {row['energy_captured']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
