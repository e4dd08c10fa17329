"""``bnb-nf4`` and ``bnb-int8``: frozen weights stored by bitsandbytes, for adapter training (LoRA etc.).

The plugin swaps, on the model instance, every ``nn.Linear`` whose weight is **frozen** for a bitsandbytes
``Linear4bit`` (NF4 or FP4, optional double quantization) or ``Linear8bitLt`` (LLM.int8 with outlier
threshold). Trainable modules (the adapters, a trainable head) stay as they are. This is what
``BitsAndBytesConfig`` does at load time, applied to a model you already have, e.g. a ``peft`` model::

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16), LoraConfig(...))
    args = LowMemTrainingArguments(..., lowmem_quantization="bnb-nf4")

bitsandbytes weights cannot be trained, so a model whose parameters all train is refused with a
:class:`~hf_lowmem.errors.PluginError` saying what to do instead (adapters, or ``int8-weights`` for
full-parameter training). Where the bitsandbytes build has no CPU kernels, a CPU run is refused at
validation (bitsandbytes >= 0.48 runs both on the CPU; CUDA is where it pays off).

Placement: the weights are quantized on the device the Trainer will train on (``args.device``) when the
model still sits on the CPU, so they are not quantized twice or moved as int8. bitsandbytes'
``Int8Params`` keeps its row statistics (``SCB``) and int8 matrix (``CB``) in attributes that a parent
module's ``.to()``/``.cuda()`` does not move (only the weight's data is replaced), so every converted
``Linear8bitLt`` also gets a forward pre-hook that puts them back beside the weight before it runs.

Saving: a ``peft`` model saves its adapters only (as peft does). Any other model is saved with the
quantized weights dequantized back to their original dtype and names (``save_dequantized``), so the
folder is a standard checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.anatomy import lm_head, unwrap
from hf_lowmem.context import mixed_precision_dtype
from hf_lowmem.errors import PluginError

logger = logging.getLogger("hf_lowmem")

NF4, INT8 = "bnb-nf4", "bnb-int8"


@dataclass
class Bnb4bitOptions:
    #: "nf4" (normal float, for normally distributed weights) or "fp4"
    quant_type: str = "nf4"
    #: quantize the quantization constants too (~0.4 bits/param saved)
    double_quant: bool = True
    #: dtype the matmuls run in: "bfloat16", "float16", "float32" (default: the weight's dtype)
    compute_dtype: str | None = None
    #: Linear modules (name suffixes) to keep unquantized; the output head is always kept
    skip_modules: list = field(default_factory=list)
    #: save non-peft models with the weights dequantized to their original dtype (a standard checkpoint)
    save_dequantized: bool = True

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in (None, "bfloat16", "float16", "float32"):
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {self.compute_dtype!r}")


@dataclass
class Bnb8bitOptions:
    #: LLM.int8 outlier threshold (input features above it run in 16 bit); 0 disables the decomposition
    threshold: float = 6.0
    #: Linear modules (name suffixes) to keep unquantized; the output head is always kept
    skip_modules: list = field(default_factory=list)
    #: save non-peft models with the weights dequantized to their original dtype (a standard checkpoint)
    save_dequantized: bool = True

    def __post_init__(self):
        if float(self.threshold) < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold!r}")


# ---- checks --------------------------------------------------------------------------------------------
_CPU_PROBE: dict[str, str | None] = {}


def cpu_support_error(name: str) -> str | None:
    """``None`` if this bitsandbytes build runs ``name``'s layer forward and backward on the CPU, else why not."""
    if name in _CPU_PROBE:
        return _CPU_PROBE[name]
    import torch

    try:
        lin = torch.nn.Linear(64, 64).requires_grad_(False)
        q = _quantized_linear(name, lin, _default_options(name), torch.float32)
        x = torch.randn(2, 64, requires_grad=True)
        q(x).sum().backward()
        err = None if x.grad is not None and torch.isfinite(x.grad).all() else "the backward pass gave no gradient"
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        err = f"{type(e).__name__}: {e}"
    _CPU_PROBE[name] = err
    return err


def _default_options(name):
    return Bnb4bitOptions() if name == NF4 else Bnb8bitOptions()


def check_trainable(model, name: str) -> None:
    """Refuse a model that would train all its parameters (bnb weights are frozen), or none."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise PluginError(f"{name}: no parameter of the model requires grad, so there is nothing to train")
    if len(trainable) == len(params):
        raise PluginError(
            f"{name} stores frozen weights with bitsandbytes, but every parameter of this model is trainable "
            "(full-parameter training). Train adapters instead: wrap the model with peft "
            "(model = get_peft_model(model, LoraConfig(...))) or freeze the base weights yourself; for "
            "full-parameter training with 8-bit weight storage use lowmem_quantization='int8-weights'."
        )


# ---- conversion --------------------------------------------------------------------------------------------
def _dtype(name: str | None, fallback):
    import torch

    return getattr(torch, name) if name else fallback


def _quantized_linear(name, lin, opts, compute_dtype, device=None):
    """A bitsandbytes layer for the frozen ``lin``, quantized on ``device`` (default: where its weight is)."""
    import bitsandbytes as bnb
    import torch

    w = lin.weight
    device = torch.device(device) if device is not None else w.device
    if name == NF4:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=opts.double_quant, quant_type=opts.quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(w.data, requires_grad=False, compress_statistics=opts.double_quant,
                                     quant_type=opts.quant_type, module=q)
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                threshold=float(opts.threshold), device="meta")
        q.weight = bnb.nn.Int8Params(w.data, requires_grad=False, has_fp16_weights=False)
    q.bias = lin.bias
    q._hf_lowmem_orig_dtype = w.dtype
    if name == NF4:
        q = q.to(device)  # Params4bit quantizes when moved to a device, whichever it comes from
        ok = getattr(q.weight, "bnb_quantized", False)
    else:
        # Int8Params quantizes only on a move *from* the CPU: quantize explicitly, on the target device
        q.weight = q.weight._quantize(device) if hasattr(q.weight, "_quantize") else q.weight.to(device)
        q = q.to(device)
        ok = q.weight.dtype == torch.int8 and getattr(q.weight, "SCB", None) is not None
        q.register_forward_pre_hook(_int8_state_follows_weight)
    if not ok:
        raise PluginError(f"{name}: bitsandbytes {getattr(bnb, '__version__', '?')} left a weight unquantized on "
                          f"{device}; this plugin needs bitsandbytes >= 0.45 (pip install 'hf-lowmem[bnb]' --upgrade)")
    q.train(lin.training)
    return q


def _int8_state_follows_weight(module, args=None):
    """Forward pre-hook of a ``Linear8bitLt``: put its int8 matrix (``CB``) and row statistics (``SCB``), on the
    weight and in ``module.state``, where the weight's data is.

    ``Module.to``/``.cuda`` on a *parent* replaces only ``weight.data`` (``param.data = moved``); bitsandbytes'
    ``Int8Params.to`` returns a new parameter with moved statistics, which ``Module._apply`` drops, and
    ``Linear8bitLt.to`` (which moves ``state``) only runs when the layer itself is moved. Left alone, the first
    forward on the GPU gets CPU statistics (bitsandbytes 0.50: ``ValueError: Expected a cuda device, but got:
    cpu`` from its cuBLAS context lookup)."""
    w = module.weight
    data = w.data
    for holder in (w, module.state):
        cb = getattr(holder, "CB", None)
        if cb is not None and cb.device != data.device:  # CB is the weight's int8 matrix: the moved data
            holder.CB = data if cb.dtype == data.dtype and cb.shape == data.shape else cb.to(data.device)
        scb = getattr(holder, "SCB", None)
        if scb is not None and scb.device != data.device:
            holder.SCB = scb.to(data.device)
    return None


def convert_model(model, name: str, opts, compute_dtype=None, device=None) -> list[str]:
    """Swap frozen ``nn.Linear`` modules for bitsandbytes layers, quantized on ``device`` (default: where each
    weight is). Returns the converted module names."""
    import torch

    head = lm_head(model)
    skip = list(opts.skip_modules or [])
    converted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head or child.weight.requires_grad:
                continue
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if any(full == s or full.endswith("." + s) for s in skip):
                continue
            cdt = _dtype(getattr(opts, "compute_dtype", None), compute_dtype or child.weight.dtype)
            setattr(parent, child_name, _quantized_linear(name, child, opts, cdt, device))
            converted.append(full)
    return converted


def _is_bnb(m) -> bool:
    return type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt")


def dequantized_weight(m):
    """The weight of a bitsandbytes ``Linear4bit``/``Linear8bitLt`` in its original dtype, on the CPU."""
    import bitsandbytes.functional as BF
    import torch

    dtype = getattr(m, "_hf_lowmem_orig_dtype", None) or torch.bfloat16
    w = m.weight
    if type(m).__name__ == "Linear4bit":
        out = BF.dequantize_4bit(w.data, w.quant_state)
    else:
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = m.state.SCB
        out = w.data.float() * (scb.to(w.device).float().unsqueeze(1) / 127.0)
    return out.to(dtype).cpu()


def dequantize_state_dict(model, state_dict) -> int:
    """Replace the bitsandbytes entries of ``state_dict`` by ``<name>.weight`` in the original dtype."""
    n = 0
    for name, m in unwrap(model).named_modules():
        if not _is_bnb(m):
            continue
        prefix = f"{name}." if name else ""
        wkey = prefix + "weight"
        if wkey not in state_dict:
            continue
        for k in [k for k in state_dict if k.startswith(wkey + ".") or k in (prefix + "SCB", prefix + "weight_format")]:
            del state_dict[k]
        state_dict[wkey] = dequantized_weight(m)
        n += 1
    return n


def _training_device(ctx, model):
    """The CUDA device the Trainer will move a model that is still on the CPU to (``args.device``), or ``None``
    (quantize where the weights are: the model is placed already, spread by a device map, or trains on the CPU)."""
    import torch

    first = next(iter(model.parameters()), None)
    if first is None or first.device.type != "cpu":
        return None
    dmap = getattr(model, "hf_device_map", None)
    if dmap and len(set(dmap.values())) > 1:
        return None
    if getattr(ctx.args, "use_cpu", False) or not torch.cuda.is_available():
        return None
    dev = torch.device(ctx.args.device)
    return dev if dev.type == "cuda" else None


# ---- the plugins -------------------------------------------------------------------------------------------
class BnbQuantization(Plugin):
    """``bnb-nf4`` or ``bnb-int8``: frozen Linear weights stored by bitsandbytes."""

    kind, requires, extra, lossless, modes = "quantization", ("bitsandbytes",), "bnb", False, ("single", "ddp")
    incompatible = {"stream": "the weight-streaming engine trains all parameters; bnb weights are frozen"}

    def validate(self, ctx):
        import torch

        if getattr(ctx.args, "use_cpu", False) or not torch.cuda.is_available():
            err = cpu_support_error(self.name)
            if err:
                raise PluginError(f"{self.name}: this bitsandbytes build cannot run on the CPU ({err}). Run on a CUDA "
                                  "GPU, or upgrade bitsandbytes (>= 0.48 has CPU kernels).")

    def prepare_model(self, ctx, model):
        name, opts = self.name, ctx.options(self.name)
        root = unwrap(model)
        check_trainable(root, name)
        converted = convert_model(root, name, opts, mixed_precision_dtype(ctx.args), _training_device(ctx, root))
        if not converted:
            raise PluginError(f"{name}: no frozen nn.Linear to quantize (skip_modules={opts.skip_modules}). Freeze the "
                              "base weights (peft does) or drop the quantization plugin.")
        ctx.state[name] = {"modules": converted}
        logger.info("%s: %d frozen Linear modules quantized with bitsandbytes", name, len(converted))
        return None

    def before_save(self, ctx, model, state_dict):
        if not ctx.options(self.name).save_dequantized or hasattr(unwrap(model), "peft_config"):
            return  # peft saves the adapters only
        dequantize_state_dict(model, state_dict)

    def plan_variants(self):
        return []  # frozen base weights are for adapter training: never chosen for full-parameter training

    def memory_model(self, plan, st):
        sh, su = plan.shape, plan.setup
        lin = sh.linear_layer_params * sh.n_layers
        st.weights -= lin * su.param_bytes
        st.weights += lin * (0.5 + 4 / 64) if self.name == NF4 else lin * (1 + 4 / 4096) + sum(
            r for _, (r, _c) in sh.layer_matrices) * sh.n_layers * 4
        st.grad_layer = [0.0] * sh.n_layers
        st.notes.append(f"{self.name} freezes the quantized base weights (adapter training): their gradients are not "
                        "counted (optimizer states still are, as if they trained); add your adapters' own")


@hookimpl
def hf_lowmem_register(register):
    register(BnbQuantization(name=NF4, options=Bnb4bitOptions,
                             help="frozen Linear weights in 4-bit NF4 (bitsandbytes Linear4bit), for adapter training"))
    register(BnbQuantization(name=INT8, options=Bnb8bitOptions,
                             help="frozen Linear weights in 8-bit LLM.int8 (bitsandbytes Linear8bitLt), for adapter "
                                  "training"))
