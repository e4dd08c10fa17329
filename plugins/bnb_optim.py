"""bitsandbytes optimizers as hf-lowmem plugins: 8-bit AdamW, paged AdamW (8- and 32-bit), 8-bit LAMB,
8-bit Lion.

8-bit states take 2 bytes per parameter for AdamW (two uint8 states, block-wise quantized) instead of 8;
Lion keeps one state (1 byte). Paged variants put their states in CUDA unified memory, which the driver
pages out to host RAM under memory pressure instead of failing with out-of-memory.

The Trainer's weight-decay groups are used (bias and norm weights get none), and ``learning_rate``,
``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` from the arguments (Lion has no epsilon; its betas can be
overridden with the option ``betas``, bitsandbytes' default for Lion being ``[0.9, 0.99]``).

**Learning rates** (``EVIDENCE``; bench/results/quality_gpu.md, an H200). The 8-bit AdamW variants make AdamW's
step: against AdamW at AdamW's learning rate, +0.39% eval loss pretraining a 25.6M Llama from scratch (-4.34% at
0.5x, as AdamW's own -4.03% there) and -0.02% fine-tuning SmolLM2-135M (-0.50% at 2x, AdamW's -0.53%). Lion's
update is ``lr * sign(...)``, whose entries are all of size ``lr``: with the Trainer's betas (0.9, 0.999) it was
**+28.51%** in pretraining, +20.70% at 0.5x (its best, and the smallest multiple run: below it, where Lion's
authors would look, was not run on the GPU), +46.56% at 2x, +58.34% at 4x, +64.40% at 8x; and +0.18% in
fine-tuning (its best; +0.84% at 0.5x, +0.64% at 2x, +2.63% at 4x, +7.34% at 8x), so it warns at construction.
Lion's own betas (0.9, 0.99), which its authors and bitsandbytes use, were worse still in the same runs (+51.39%
pretraining, +28.99% at 0.5x; +0.65% fine-tuning, x1 only), so the plugin keeps passing the Trainer's betas.

Options (``lowmem_options={"bnb-adamw8bit": {...}}``): ``min_8bit_size`` (tensors with fewer elements
keep 32-bit state; bitsandbytes' default 4096), ``embeddings_32bit`` (keep the states of ``nn.Embedding``
weights in 32 bits, as bitsandbytes recommends for stability; on by default; set per optimizer instance,
not through bitsandbytes' process-wide manager) and ``betas``. bitsandbytes 0.49 and later always quantize
block-wise, no longer offer percentile clipping, and fix LAMB's ``max_unorm`` at 1.0, so those are not
options here; use the Trainer's ``max_grad_norm`` for clipping.

A caution on ``bnb-lamb8bit``: in bitsandbytes 0.49-0.50 the "lamb" update dispatches to the Adam kernels
(``backends/cuda/ops.py`` and ``backends/cpu/ops.py``), and 8-bit block-wise states take no ``max_unorm``
cap, so it behaves as 8-bit AdamW, without LAMB's per-layer trust ratio.

On CPU (bitsandbytes 0.50.2) every one of these runs, through bitsandbytes' CPU kernels (slowly: ~22 M
params/s measured on a 2-core machine); the paged variants fall back to ordinary CPU tensors there (paging
is a CUDA feature; bitsandbytes warns once).

LAMB 8-bit: bitsandbytes (0.49-0.50 at least) has no CUDA block-wise kernel named ``lamb``
(``str2optimizer8bit_blockwise`` in ``backends/cuda/ops.py`` lists adam, momentum, rmsprop, lion, adagrad
and ademamix), so ``LAMB8bit.step`` on the GPU raises ``ValueError: Unsupported optimizer name: lamb``.
Its own CPU kernels run ``lamb`` as the block-wise Adam update (``backends/cpu/ops.py``: ``if
optimizer_name in ("adam", "lamb")``, 8-bit and 32-bit alike), and on CUDA the 32-bit ``lamb`` entry is
the Adam kernel too. This plugin therefore names the optimizer ``adam`` for bitsandbytes' kernels when the
CUDA build lacks a ``lamb`` block-wise kernel: the arithmetic is bitsandbytes' LAMB8bit as its CPU kernels
define it, on both devices. In these versions that is Adam(W) with 8-bit states; LAMB's update-norm
clipping (``max_unorm=1.0``) applies only to the 32-bit states of tensors below ``min_8bit_size`` (the
8-bit update does not implement it; bitsandbytes' own docstring says so), so do not expect a layer-wise
trust ratio on the quantized tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import logging

from hf_lowmem import Plugin, hookimpl
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, lr_message, measured_sentence
from hf_lowmem_plugins.lr_evidence import say_once

logger = logging.getLogger("hf_lowmem.bnb_optim")

#: plugin name -> (bitsandbytes.optim class, help, optimizer states per parameter, bits per state)
VARIANTS = {
    "bnb-adamw8bit": ("AdamW8bit", "bitsandbytes 8-bit AdamW (block-wise quantized states: 2 bytes/param)", 2, 8),
    "bnb-paged-adamw8bit": ("PagedAdamW8bit", "bitsandbytes paged 8-bit AdamW (states page to host RAM under GPU "
                            "pressure)", 2, 8),
    "bnb-paged-adamw32bit": ("PagedAdamW32bit", "bitsandbytes paged 32-bit AdamW (exact AdamW states, paged to host "
                             "RAM)", 2, 32),
    "bnb-lamb8bit": ("LAMB8bit", "bitsandbytes LAMB8bit; in bitsandbytes 0.49-0.50 its 8-bit update is AdamW's (no "
                     "trust ratio)", 2, 8),
    "bnb-lion8bit": ("Lion8bit", "bitsandbytes 8-bit Lion (one momentum state: 1 byte/param; sign updates: see its "
                     "learning-rate note)", 1, 8),
}


_ADAMW8 = (Measured(0.39, 0.5, -4.34, PRETRAIN), Measured(-0.02, 2, -0.50, FINETUNE))
#: what bench/quality.py measured, per plugin (with the Trainer's betas; bench/results/quality_gpu.md); variants with
#: the same arithmetic as 8-bit AdamW share its numbers. The 32-bit paged AdamW makes AdamW's own step: nothing to say.
EVIDENCE = {
    "bnb-adamw8bit": Evidence(_ADAMW8, "bnb-adamw8bit"),
    "bnb-paged-adamw8bit": Evidence(_ADAMW8, "bnb-adamw8bit", measured_as="bnb-adamw8bit, the same 8-bit AdamW "
                                                                         "(paging only moves its states)"),
    "bnb-lamb8bit": Evidence(_ADAMW8, "bnb-adamw8bit", measured_as="bnb-adamw8bit: in bitsandbytes 0.49-0.50 "
                                                                  "LAMB8bit's 8-bit update is AdamW's"),
    "bnb-lion8bit": Evidence((Measured(28.51, 0.5, 20.70, PRETRAIN), Measured(0.18, 1, 0.18, FINETUNE)), "bnb-lion8bit",
                             measured_as="bnb-lion8bit with the Trainer's betas (0.9, 0.999)"),
    "bnb-lion8bit betas 0.9, 0.99": Evidence(  # pretraining: x8 skipped (budget); fine-tuning: x1 only
        (Measured(51.39, 0.5, 28.99, PRETRAIN, mults=(0.5, 1.0, 2.0, 4.0)),
         Measured(0.65, 1, 0.65, FINETUNE, mults=(1.0,))), "lion-b99", measured_as="bnb-lion8bit with betas (0.9, 0.99)"),
}
_WHY = {
    "lion": "Lion's update is lr * sign(interpolated momentum): every entry has size lr, where AdamW's entries shrink "
            "below lr as its second moment builds up, which is why Lion's authors use a 3-10x smaller learning rate",
    "adamw": "8-bit block-wise states with AdamW's update rule: its step is AdamW's at the same learning rate",
}


@dataclass
class BnbOptions:
    """Options shared by the bitsandbytes optimizer plugins.

    :param min_8bit_size: tensors with fewer elements keep 32-bit optimizer state.
    :param embeddings_32bit: keep 32-bit state for ``nn.Embedding`` weights (bitsandbytes' advice).
    :param betas: override ``(adam_beta1, adam_beta2)`` from the training arguments.
    """

    min_8bit_size: int = 4096
    embeddings_32bit: bool = True
    betas: list[float] | None = None

    def __post_init__(self):
        if not isinstance(self.min_8bit_size, int) or self.min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an integer >= 0, got {self.min_8bit_size!r}")
        if self.betas is not None:
            if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
                raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
            self.betas = [float(b) for b in self.betas]


class BnbOptimizer(Plugin):
    """One bitsandbytes optimizer (``cls_name`` in ``bitsandbytes.optim``); one instance per variant."""

    kind, requires, extra, options, lossless = "optimizer", ("bitsandbytes",), "bnb", BnbOptions, False
    # every variant runs on CPU with bitsandbytes >= 0.48 (the paged ones without paging)
    needs_cuda = False
    # not FSDP2: its parameters are DTensors, which bitsandbytes' 8-bit kernels do not take (state
    # buffers sized for the global tensor; illegal memory access: bitsandbytes issue #1633, open)
    modes = ("single", "dp", "ddp", "deepspeed")

    def __init__(self, name: str, cls_name: str, help: str, n_states: int, bits: int):
        ev = EVIDENCE.get(name)
        super().__init__(name=name, help=help, quality_gap=ev.gap_pct if ev else None,
                         lr_advice=advice(ev, name) if ev else "")
        self.cls_name, self.n_states, self.bits = cls_name, n_states, bits

    def validate(self, ctx):
        ev = EVIDENCE.get(self.name)
        if ev is None:
            return
        betas = ctx.options(self.name).betas
        if self.name == "bnb-lion8bit" and betas is not None:
            ev = EVIDENCE.get(f"bnb-lion8bit betas {betas[0]:g}, {betas[1]:g}")
            if ev is None:  # betas nobody measured: the betas and the measurement with the Trainer's
                m = EVIDENCE["bnb-lion8bit"]
                say_once(logger, logging.WARNING, f"{self.name}: betas {betas} are not measured; {_WHY['lion']}; "
                         f"with the Trainer's betas {measured_sentence(m)}")
                return
        why = _WHY["lion" if "lion" in self.name else "adamw"]
        say_once(logger, *lr_message(self.name, ev, ctx.args.learning_rate, why))

    def optimizer_cls_and_kwargs(self, ctx, model):
        self.import_requirements()
        import bitsandbytes as bnb

        return getattr(bnb.optim, self.cls_name), _bnb_kwargs(self.name, ctx.args, ctx.options(self.name))

    def create_optimizer(self, ctx, model, trainer):
        import torch.nn as nn

        opts = ctx.options(self.name)
        optimizer = super().create_optimizer(ctx, model, trainer)
        if self.name == "bnb-lamb8bit":
            _lamb_on_available_kernels(optimizer)
        mng = _private_manager(optimizer)
        if opts.embeddings_32bit:
            emb = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
            if emb:
                mng.override_config(emb, key_value_dict={"optim_bits": 32})
        return optimizer

    def memory_model(self, plan, st):
        from hf_lowmem.planner import bnb8_state_bytes

        n_states, bits, opts = self.n_states, self.bits, self.options_for(plan)
        states = 0.0
        for kind, n in plan.shape.param_sizes():
            if bits == 32 or (kind == "embed" and opts.embeddings_32bit):
                states += 4.0 * n_states * n
            else:
                states += bnb8_state_bytes(n, opts.min_8bit_size, n_states)
        if bits == 8:
            states += 2 * 256 * 4  # the signed and unsigned quantization maps, shared by every parameter
        if "paged" in self.cls_name.lower():
            st.states_paged = states
            st.notes.append(f"{self.name}: states live in CUDA managed (paged) memory, outside torch's allocated "
                            "count; they page out to host RAM when the GPU runs short")
        else:
            st.states = states
        pb = plan.setup.param_bytes
        st.opt_bytes_per_param = 3 * pb + 2 * n_states * bits / 8
        # calibrated on the peers' run: 8-bit AdamW + checkpointing reached 66% of the ceiling on 7B (~0.1 s/step)
        st.opt_kernel_factor = 5.0 if bits == 8 else 1.5


@hookimpl
def hf_lowmem_register(register):
    for name, variant in VARIANTS.items():
        register(BnbOptimizer(name, *variant))


def _bnb_kwargs(name: str, args, opts: BnbOptions) -> dict:
    betas = tuple(opts.betas) if opts.betas is not None else (args.adam_beta1, args.adam_beta2)
    kw = dict(lr=args.learning_rate, betas=betas, min_8bit_size=opts.min_8bit_size)
    if name != "bnb-lion8bit":
        kw["eps"] = args.adam_epsilon
    return kw


def _private_manager(optimizer):
    """Give the optimizer its own bitsandbytes config manager: overrides set through it stay with this
    optimizer instead of bitsandbytes' process-wide singleton (which keys them by ``id(param)``)."""
    from bitsandbytes.optim import GlobalOptimManager

    mng = GlobalOptimManager.__new__(GlobalOptimManager)
    mng.initialize()
    optimizer.mng = mng
    return mng


def _cuda_blockwise_kernels():
    """The optimizer names bitsandbytes' CUDA backend has 8-bit block-wise kernels for, or ``None`` where there
    is no CUDA backend (CPU-only torch or bitsandbytes)."""
    try:
        from bitsandbytes.backends.cuda import ops as cuda_ops
    except Exception:  # noqa: BLE001 - no CUDA here: bitsandbytes' CPU kernels take either name
        return None
    return set(getattr(cuda_ops, "str2optimizer8bit_blockwise", {}))


def _lamb_on_available_kernels(optimizer) -> None:
    """Instance patch: run bitsandbytes' ``LAMB8bit`` under the kernel name ``adam`` unless its CUDA backend
    has a ``lamb`` block-wise kernel. Same arithmetic on the CPU (where bitsandbytes treats both names alike),
    and what makes it run at all on CUDA (see the module docstring)."""
    if getattr(optimizer, "optimizer_name", None) != "lamb":
        return
    kernels = _cuda_blockwise_kernels()
    if kernels is None or "lamb" not in kernels:
        optimizer.optimizer_name = "adam"
