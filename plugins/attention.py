"""Attention plugins: ``flash-attn``, ``sdpa`` and ``auto-attention``.

``flash-attn``
    FlashAttention 2 from the ``flash-attn`` package (transformers' ``flash_attention_2``). Demanding it
    where the package does not import is a :class:`~hf_lowmem.errors.MissingExtraError` naming the extra
    ``hf-lowmem[flash-attn]``. CUDA only; needs fp16/bf16 (weights, or ``bf16=True``/``fp16=True``).
``sdpa``
    PyTorch's ``scaled_dot_product_attention`` (transformers' ``sdpa``). PyTorch picks the flash kernel,
    then the memory-efficient one, then the math fallback, which materialises the seq x seq scores. On a
    GPU the plugin checks, at model preparation, that a flash or memory-efficient kernel really runs
    forward and backward for the model's dtype and head size, and raises with the fix if neither does
    (``require_fused=False`` turns that into a warning). ``enforce=True`` also keeps the math fallback
    out during training, so an unsupported call fails loudly instead of silently using O(seq^2) memory.
``auto-attention``
    ``flash-attn`` where the package imports and runs here, else ``sdpa`` (with the same check).

All three set the attention implementation on the model *instance* (``model.set_attn_implementation``
in transformers 5, else ``config._attn_implementation``); none changes the arithmetic beyond kernel
rounding, so they count as lossless.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.context import mixed_precision_dtype
from hf_lowmem.errors import MissingExtraError, PluginError

logger = logging.getLogger("hf_lowmem")

FLASH, SDPA, AUTO = "flash-attn", "sdpa", "auto-attention"
NAMES = (FLASH, SDPA, AUTO)


@dataclass
class SdpaOptions:
    #: on a GPU, raise (True) or warn (False) when neither the flash nor the memory-efficient kernel runs
    require_fused: bool = True
    #: during training, allow only the flash and memory-efficient kernels (no math fallback)
    enforce: bool = False


# ---- helpers -------------------------------------------------------------------------------------------
def set_attn_implementation(model, impl: str) -> None:
    """Set the attention implementation of this model instance (and its sub-models)."""
    try:
        model.set_attn_implementation(impl)
    except (ImportError, ValueError) as e:
        raise PluginError(f"transformers refused attention implementation {impl!r} for "
                          f"{type(model).__name__}: {e}") from e


def attn_implementation(model) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_attn_implementation", None)


def _compute_dtype(ctx, model):
    import torch

    dtype = mixed_precision_dtype(ctx.args)
    if dtype is not None:
        return dtype
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _head_dims(model):
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None) or 1
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def _on_gpu(ctx) -> bool:
    import torch

    return torch.cuda.is_available() and not getattr(ctx.args, "use_cpu", False)


def fused_sdpa_backends(dtype, head_dim: int, heads: int = 4, kv_heads: int | None = None, device="cuda") -> list[str]:
    """The fused SDPA kernels ('flash', 'efficient') that run forward and backward here for a causal
    call with this dtype and head size (a tiny real call under ``sdpa_kernel`` for each)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_heads = kv_heads or heads
    ok = []
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            q = torch.randn(1, heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(1, heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(1, heads, 64, head_dim, device=device, dtype=dtype, requires_grad=True)
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()
            ok.append(name)
        except RuntimeError:
            continue
    return ok


def _check_sdpa(ctx, model, name, opts):
    _, _, head_dim = _head_dims(model)
    heads, kv, _ = _head_dims(model)
    dtype = _compute_dtype(ctx, model)
    if not _on_gpu(ctx):
        ctx.state[name] = {"implementation": "sdpa", "backends": None, "checked": False}
        return
    backends = fused_sdpa_backends(dtype, head_dim, heads=min(heads, 4), kv_heads=min(kv, 4))
    ctx.state[name] = {"implementation": "sdpa", "backends": backends, "checked": True}
    if backends:
        logger.info("sdpa: fused kernels that run for %s, head_dim %d: %s", dtype, head_dim, ", ".join(backends))
        return
    msg = (f"sdpa: neither the flash nor the memory-efficient SDPA kernel runs on this GPU for dtype {dtype} and "
           f"head_dim {head_dim}; PyTorch would fall back to the math kernel, which materialises seq x seq "
           "attention scores. Train in bf16/fp16 (bf16=True), or use a head size the kernels support (<= 256, "
           "a multiple of 8).")
    if opts.require_fused:
        raise PluginError(msg + ' To run anyway, pass lowmem_options {"sdpa": {"require_fused": false}}.')
    warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _enforce_fused(model):
    """During training forward/backward of this instance, allow only the fused SDPA kernels."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def pre(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            cm = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
            cm.__enter__()
            module._hf_lowmem_sdpa_cm = cm
        return None

    def post(module, args, kwargs, output):
        cm = module.__dict__.pop("_hf_lowmem_sdpa_cm", None)
        if cm is not None:
            cm.__exit__(None, None, None)
        return None

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True, always_call=True)


def flash_attn_usable(ctx, model) -> tuple[bool, str]:
    """Whether flash-attn imports and accepts this model here (GPU, half precision)."""
    import torch

    try:
        import flash_attn  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install can raise anything
        return False, f"flash_attn does not import ({type(e).__name__}: {e})"
    if not _on_gpu(ctx):
        return False, "no CUDA GPU"
    dtype = _compute_dtype(ctx, model)
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"FlashAttention 2 needs fp16/bf16 and the model computes in {dtype}"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "FlashAttention 2 needs an Ampere or newer GPU"
    return True, ""


# ---- the plugins ---------------------------------------------------------------------------------------
class _Attention(Plugin):
    """An attention plugin: the transformers attention implementation it selects (``implementation``, which
    the memory planner plans with) and how it is checked."""

    kind = "attention"
    implementation = "sdpa"

    def plan_setup(self, plan):
        import dataclasses

        return dataclasses.replace(plan.setup, attn_impl=self.implementation)

    def plan_variants(self):
        return []  # kernels change speed, not the memory the planner counts: it never picks one on its own

    def memory_model(self, plan, step):
        return None  # the implementation is part of the setup (plan_setup)


class FlashAttention(_Attention):
    name, requires, extra, needs_cuda = FLASH, ("flash_attn",), "flash-attn", True
    help = "FlashAttention 2 (flash-attn package) as the model's attention implementation"
    implementation = "flash_attention_2"

    def prepare_model(self, ctx, model):
        ok, why = flash_attn_usable(ctx, model)
        if not ok:
            if why.startswith("flash_attn does not import"):
                raise MissingExtraError(FLASH, "flash_attn", "flash-attn")
            raise PluginError(f"flash-attn cannot run here: {why}. Use bf16=True on an Ampere+ GPU, or choose sdpa.")
        set_attn_implementation(model, "flash_attention_2")
        ctx.state[self.name] = {"implementation": "flash_attention_2"}
        return None


class Sdpa(_Attention):
    name, options = SDPA, SdpaOptions
    help = "PyTorch SDPA (flash, else memory-efficient kernel), checked on the GPU to really run"

    def prepare_model(self, ctx, model):
        opts = ctx.options(self.name)
        set_attn_implementation(model, "sdpa")
        _check_sdpa(ctx, model, self.name, opts)
        if opts.enforce:
            _enforce_fused(model)
        return None


class AutoAttention(Sdpa):
    name = AUTO
    help = "flash-attn when the package imports and runs here, otherwise PyTorch SDPA"

    def prepare_model(self, ctx, model):
        ok, why = flash_attn_usable(ctx, model)
        if ok:
            try:
                set_attn_implementation(model, "flash_attention_2")
                ctx.state[self.name] = {"implementation": "flash_attention_2"}
                logger.info("auto-attention: using FlashAttention 2")
                return None
            except PluginError as e:
                why = str(e)
        logger.info("auto-attention: flash-attn not used (%s); using PyTorch SDPA", why)
        return super().prepare_model(ctx, model)


@hookimpl
def hf_lowmem_register(register):
    for plugin in (FlashAttention(), Sdpa(), AutoAttention()):
        register(plugin)
