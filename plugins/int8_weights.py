"""``int8-weights``: full-parameter training with the Linear weights stored in int8 (the idea behind Q-GaLore).

Every trainable ``nn.Linear`` of the decoder (not the LM head unless asked) is swapped, on the model
instance, for an :class:`Int8Linear` that keeps

* ``weight_int8``: the weight as int8, one fp32 absmax scale per block of ``block_size`` input columns
  (``block_size=0``: one per row), in ``weight_scale``;
* ``weight``: the trainable parameter the optimizer and the Trainer see, with the right shape, dtype and
  device, but no storage of its own (a zero-stride view of one element) except during its update.

Forward dequantizes the weight on the fly (fp32 multiply, cast to the compute dtype) inside a custom
autograd function that saves only the layer input; backward dequantizes again for the input gradient and
writes the weight gradient, in the model's dtype, into ``weight.grad`` as usual.

The update: the plugin wraps the optimizer's ``step`` (on the instance, from a callback at the start of
training) so that it runs once for the parameters that are not int8, then once per decoder layer: that
layer's weights are dequantized into fp32 masters (and their gradients upcast), the *unchanged* optimizer
(AdamW, 8-bit AdamW, Lion, Adafactor, ...) updates them in high precision, and the result is written
back to int8 with **stochastic rounding** (``floor(w / scale + U[0, 1))``, unbiased: small updates
survive on average instead of being rounded away), with fresh block scales. So the fp32 master of one
layer exists only transiently.

Bytes per parameter of a converted Linear: 1 (int8) + 4 / block_size (scales; 0.03 at 128) for the
weight, instead of 2 (bf16) or 6 (bf16 + fp32 master); plus the gradient in the model's dtype and the
optimizer's states, as in any run (with bnb-adamw8bit: ~1.03 + 2 + 2 = ~5 bytes/param instead of 16).

Saving restores the original precision: the plugin's ``before_save`` replaces ``<name>.weight_int8`` and
``<name>.weight_scale`` with ``<name>.weight`` in the original dtype, so a saved folder is a standard
transformers checkpoint (``AutoModelForCausalLM.from_pretrained`` loads it). Loading such a state dict
into a converted model re-quantizes it (round to nearest). Lossy (int8 storage): ``lossless=False``.
The stochastic-rounding generator is registered with :func:`hf_lowmem.checkpoint.register_rng`: checkpoints
hold its state and a resumed run continues its stream, so resuming gives the losses and weights of an
uninterrupted run.

(Over 400 lines: the quantization arithmetic, the module that stores its weight in int8 (autograd function,
moves, state dict), the layer-by-layer optimizer step and the plugin belong together; each part is small.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.anatomy import decoder_layers, embeddings, lm_head, unwrap
from hf_lowmem.errors import PluginError
from hf_lowmem_plugins.lr_evidence import FINETUNE, PRETRAIN, Evidence, Measured, advice, lr_message, say_once

logger = logging.getLogger("hf_lowmem")

NAME = "int8-weights"
QMAX = 127


@dataclass
class Int8WeightsOptions:
    #: input columns per absmax scale (0 = one scale per row); must divide in_features, else per row
    block_size: int = 128
    #: dtype of the transient master weights the optimizer updates ("float32" or "bfloat16")
    master_dtype: str = "float32"
    #: also store the LM head in int8 (off by default: it is small relative to 7B and sensitive)
    include_lm_head: bool = False
    #: only convert Linear modules whose name ends with one of these (default: every trainable Linear)
    modules: list = field(default_factory=list)
    #: seed of the stochastic-rounding generator (default: the run's seed)
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0 = per row), got {self.block_size!r}")
        if self.master_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"master_dtype must be 'float32' or 'bfloat16', got {self.master_dtype!r}")
        if not isinstance(self.modules, (list, tuple)) or not all(isinstance(m, str) for m in self.modules):
            raise ValueError("modules must be a list of module-name suffixes, e.g. ['q_proj', 'v_proj']")


# ---- quantization ------------------------------------------------------------------------------------------
def stochastic_round(y, generator=None):
    """Round ``y`` to an integer-valued tensor, up with probability ``frac(y)``: ``E[result] == y``."""
    import torch

    noise = torch.rand(y.shape, generator=generator, device=y.device, dtype=torch.float32)
    return torch.floor(y.float() + noise)


def _blocks(in_features: int, block_size: int) -> int:
    return block_size if block_size and in_features % block_size == 0 else in_features


def quantize(w, block_size: int, stochastic: bool = False, generator=None):
    """``w`` (out, in) -> (int8 values, fp32 scales of shape (out, in // block)) with absmax scaling."""
    import torch

    out_f, in_f = w.shape
    b = _blocks(in_f, block_size)
    wb = w.detach().float().reshape(out_f, in_f // b, b)
    scale = wb.abs().amax(dim=-1).clamp_min(1e-30) / QMAX
    y = wb / scale.unsqueeze(-1)
    q = stochastic_round(y, generator) if stochastic else torch.round(y)
    return q.clamp_(-QMAX, QMAX).to(torch.int8).reshape(out_f, in_f), scale


def dequantize(q, scale, dtype):
    import torch

    out_f, in_f = q.shape
    nb = scale.shape[-1]
    w = q.reshape(out_f, nb, in_f // nb).to(torch.float32) * scale.unsqueeze(-1).to(torch.float32)
    return w.reshape(out_f, in_f).to(dtype)


def _placeholder(shape, dtype, device):
    import torch

    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def _make_module_classes():
    import torch
    import torch.nn.functional as F

    class Int8LinearFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, module):
            dev = x.device.type
            autocast = torch.is_autocast_enabled(dev)
            dt = torch.get_autocast_dtype(dev) if autocast else x.dtype
            w = module.dequantized(dt)
            with torch.autocast(dev, enabled=False):
                y = F.linear(x.to(dt), w, None if bias is None else bias.to(dt))
            ctx.save_for_backward(x)
            ctx.module, ctx.dt = module, dt
            ctx.bias_dtype = None if bias is None else bias.dtype
            return y

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            m, dt = ctx.module, ctx.dt
            g = grad.to(dt)
            gx = gw = gb = None
            if ctx.needs_input_grad[0]:
                gx = (g @ m.dequantized(dt)).to(x.dtype)
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(dt)).to(m._dtype)
            if ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(ctx.bias_dtype)
            return gx, gw, gb, None

    class Int8Linear(torch.nn.Module):
        """A Linear whose trainable weight is stored as int8 with block absmax scales (see module doc)."""

        def __init__(self, linear, block_size: int = 128):
            super().__init__()
            w = linear.weight
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.block_size = _blocks(self.in_features, block_size)
            q, scale = quantize(w.data, self.block_size)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
            self.weight = torch.nn.Parameter(_placeholder(w.shape, w.dtype, w.device), requires_grad=w.requires_grad)
            self.bias = linear.bias
            self._orig_dtype = w.dtype
            self._master = None  # (grad in the model dtype) while the optimizer updates this layer

        def extra_repr(self):
            return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                    f"int8, block={self.block_size}, dtype={self.weight.dtype}")

        def dequantized(self, dtype=None):
            return dequantize(self.weight_int8, self.weight_scale, dtype or self.weight.dtype)

        def forward(self, x):
            return Int8LinearFunction.apply(x, self.weight, self.bias, self)

        # -- the update, one layer at a time (driven by the optimizer wrapper) --
        def begin_update(self, master_dtype):
            """Give ``weight`` a real high-precision value and gradient for one optimizer step."""
            p = self.weight
            g = p.grad
            p.grad = None
            p.data = self.dequantized(master_dtype)
            p.grad = None if g is None else g.to(master_dtype)
            self._master = g

        def end_update(self, generator=None):
            """Write the updated master back to int8 (stochastic rounding) and drop it."""
            p = self.weight
            q, scale = quantize(p.data, self.block_size, stochastic=True, generator=generator)
            self.weight_int8.copy_(q)
            self.weight_scale.copy_(scale)
            g, self._master = self._master, None
            p.grad = None
            p.data = _placeholder(p.shape, self._dtype, p.device)
            p.grad = g

        @property
        def _dtype(self):
            """The model's dtype for this weight (its gradient's dtype; what saving restores)."""
            return self._orig_dtype

        # -- moving / casting: keep the placeholder storage-free and the scales fp32 --
        def _apply(self, fn, recurse=True):
            ph = self._parameters.pop("weight")
            try:
                super()._apply(fn, recurse)
            finally:
                self._parameters["weight"] = ph
            if self.weight_scale.dtype != torch.float32:
                self.weight_scale = self.weight_scale.float()
            probe = fn(torch.zeros((), dtype=ph.dtype, device=ph.device))
            if probe.dtype != ph.dtype or probe.device != ph.device:
                g = ph.grad
                ph.grad = None
                ph.data = _placeholder(ph.shape, probe.dtype, probe.device)
                if g is not None:
                    ph.grad = fn(g)
                self._orig_dtype = probe.dtype
            return self

        # -- state dict: int8 + scales; a full `weight` is accepted on load --
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            ph = self._parameters.pop("weight")
            try:
                super()._save_to_state_dict(destination, prefix, keep_vars)
            finally:
                self._parameters["weight"] = ph

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            ph = self._parameters.pop("weight")
            full = state_dict.get(prefix + "weight")
            try:
                before = set(missing_keys)
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)
            finally:
                self._parameters["weight"] = ph
            if prefix + "weight" in unexpected_keys:
                unexpected_keys.remove(prefix + "weight")
            if full is not None:
                if tuple(full.shape) != tuple(ph.shape):
                    error_msgs.append(f"size mismatch for {prefix}weight: {tuple(full.shape)} vs {tuple(ph.shape)}")
                    return
                q, scale = quantize(full.to(self.weight_int8.device), self.block_size)
                with torch.no_grad():
                    self.weight_int8.copy_(q)
                    self.weight_scale.copy_(scale)
                for k in (prefix + "weight_int8", prefix + "weight_scale"):
                    if k in missing_keys and k not in before:
                        missing_keys.remove(k)
            elif prefix + "weight_int8" not in state_dict and strict:
                missing_keys.append(prefix + "weight")

    return Int8LinearFunction, Int8Linear


_CLASSES = None


def _classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_module_classes()
    return _CLASSES


def int8_linear_class():
    return _classes()[1]


# ---- conversion -----------------------------------------------------------------------------------------
def convert_model(model, block_size: int = 128, include_lm_head: bool = False, modules=()) -> list[str]:
    """Swap the trainable ``nn.Linear`` modules of ``model`` for :class:`Int8Linear` (instance change).
    Returns the converted module names."""
    import torch

    Int8Linear = int8_linear_class()
    head = lm_head(model)
    shared = set()
    emb = embeddings(model)
    if emb is not None and getattr(emb, "weight", None) is not None:
        shared.add(id(emb.weight))
    converted = []
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if child is head and not include_lm_head:
                continue
            if not child.weight.requires_grad or id(child.weight) in shared:
                continue
            if modules and not any(full == m or full.endswith("." + m) for m in modules):
                continue
            new = Int8Linear(child, block_size)
            new.train(child.training)
            setattr(mod, child_name, new)
            converted.append(full)
    return converted


def int8_modules(model) -> list[tuple[str, object]]:
    Int8Linear = int8_linear_class()
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, Int8Linear)]


def restore_model(model):
    """Swap every :class:`Int8Linear` back for a ``nn.Linear`` in the original dtype (after training)."""
    import torch

    root = unwrap(model)
    for name, m in int8_modules(root):
        parent = root.get_submodule(name.rsplit(".", 1)[0]) if "." in name else root
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(m.dequantized(m._dtype), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            lin.bias = m.bias
        setattr(parent, name.rsplit(".", 1)[-1], lin)
    return model


def dequantize_state_dict(model, state_dict) -> None:
    """Rewrite ``state_dict`` in place: int8 + scale entries of converted Linears become ``weight`` in the
    original dtype."""
    for name, m in int8_modules(model):
        prefix = f"{name}." if name else ""
        qk, sk = prefix + "weight_int8", prefix + "weight_scale"
        if qk not in state_dict:
            continue
        q, scale = state_dict.pop(qk), state_dict.pop(sk)
        state_dict[prefix + "weight"] = dequantize(q, scale, m._dtype)


def layer_groups(model) -> list[list]:
    """The int8 modules grouped by decoder layer (a module outside the layers, e.g. the LM head, alone), in
    model order: what the optimizer updates together."""
    layer_of = {id(m): i for i, layer in enumerate(decoder_layers(unwrap(model))) for m in layer.modules()}
    groups: dict = {}
    for name, m in int8_modules(model):
        groups.setdefault(layer_of.get(id(m), name), []).append(m)
    return list(groups.values())


# ---- the optimizer step -----------------------------------------------------------------------------------
def _innermost(optimizer):
    seen = set()
    while hasattr(optimizer, "optimizer") and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def wrap_optimizer(optimizer, model, master_dtype: str = "float32", generator=None):
    """Make ``optimizer.step`` update int8 weights layer by layer (see module doc). Idempotent. Use it in a
    hand-written loop; inside the Trainer the plugin does it at the start of training."""
    import torch

    opt = _innermost(optimizer)
    if getattr(opt, "_hf_lowmem_int8_wrapped", False):
        return optimizer
    groups = layer_groups(model)
    int8_params = {id(m.weight) for g in groups for m in g}
    for g in groups:
        for m in g:
            if getattr(m.weight, "_post_accumulate_grad_hooks", None):
                raise PluginError("int8-weights cannot be combined with an optimizer that updates parameters inside "
                                  "backward (layer-wise GaLore): it must own the update of int8 weights. Choose a "
                                  "non-layer-wise optimizer.")
    mdt = getattr(torch, master_dtype)
    step = opt.step

    def layerwise_step(closure=None):
        if closure is not None:
            raise PluginError("int8-weights steps layer by layer and cannot re-evaluate a closure; "
                              "use an optimizer that does not need one")
        params = [p for group in opt.param_groups for p in group["params"]]
        grads = {id(p): p.grad for p in params}
        for p in params:
            p.grad = None
        result = None
        try:
            for p in params:  # 1. everything that is not int8, in one call
                if id(p) not in int8_params:
                    p.grad = grads[id(p)]
            result = step()
            for p in params:
                p.grad = None
            for group in groups:  # 2. one decoder layer at a time
                active = [m for m in group if grads.get(id(m.weight)) is not None]
                if not active:
                    continue
                for m in active:
                    m.weight.grad = grads[id(m.weight)]
                    m.begin_update(mdt)
                try:
                    step()
                finally:
                    for m in active:
                        m.end_update(generator)
                        m.weight.grad = None
        finally:
            for p in params:
                p.grad = grads[id(p)]
        return result

    opt.step = layerwise_step
    opt._hf_lowmem_int8_wrapped = True
    return optimizer


def _callback(ctx):
    from transformers import TrainerCallback

    from hf_lowmem.checkpoint import register_rng

    class Int8WeightsCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            import torch

            if optimizer is None or model is None:
                raise PluginError("int8-weights: the Trainer gave no optimizer/model to wrap at the start of training")
            opts = ctx.options(NAME)
            mods = int8_modules(model)
            device = mods[0][1].weight_int8.device if mods else torch.device("cpu")
            gen = torch.Generator(device=device)
            gen.manual_seed(int(opts.seed if opts.seed is not None else args.seed) + 8128)
            # saved in every checkpoint and restored on resume (the resumed state replaces the seed's), so that a
            # resumed run rounds exactly as an uninterrupted one
            register_rng(ctx, NAME, gen)
            wrap_optimizer(optimizer, model, opts.master_dtype, gen)
            ctx.state.setdefault(NAME, {})["generator"] = gen

    return Int8WeightsCallback()


# ---- the plugin ----------------------------------------------------------------------------------------------
#: what bench/quality.py measured with the Trainer's AdamW, at AdamW's learning rate only (bench/results/quality_gpu.md)
EVIDENCE = Evidence((Measured(-0.15, 1, -0.15, PRETRAIN, mults=(1.0,)), Measured(0.03, 1, 0.03, FINETUNE, mults=(1.0,))),
                    "int8-weights", measured_as="int8-weights with the Trainer's AdamW")


class Int8Weights(Plugin):
    name, kind, options, lossless, modes = NAME, "quantization", Int8WeightsOptions, False, ("single", "ddp")
    incompatible = {"stream": "the weight-streaming engine keeps its own weight masters and optimizer step"}
    help = ("trainable Linear weights stored in int8 (block absmax), updated in fp32 one layer at a time and "
            "written back with stochastic rounding; saved in the original dtype")

    quality_gap, lr_advice = EVIDENCE.gap_pct, advice(EVIDENCE)

    def validate(self, ctx):
        why = ("the optimizer updates fp32 masters of each layer and the result is written back to int8 with "
               "stochastic rounding, so its step is the optimizer's own and updates smaller than one int8 step survive "
               "on average")
        say_once(logger, *lr_message(NAME, EVIDENCE, ctx.args.learning_rate, why))

    def prepare_model(self, ctx, model):
        opts = ctx.options(NAME)
        converted = convert_model(unwrap(model), opts.block_size, opts.include_lm_head, opts.modules)
        if not converted:
            raise PluginError("int8-weights found no trainable nn.Linear to convert"
                              + (f" matching modules={opts.modules}" if opts.modules else "")
                              + "; it stores trainable weights in int8, so it needs a model whose Linear weights train.")
        n = sum(m.weight.numel() for _, m in int8_modules(model))
        ctx.state.setdefault(NAME, {}).update({"modules": converted, "params": n})
        logger.info("int8-weights: %d Linear modules (%.1fM params) stored in int8", len(converted), n / 1e6)
        return None

    def callbacks(self, ctx):
        return [_callback(ctx)]

    def before_save(self, ctx, model, state_dict):
        dequantize_state_dict(model, state_dict)

    def memory_model(self, plan, st):
        sh, su, opts = plan.shape, plan.setup, self.options_for(plan)
        block = int(opts.block_size)
        master = 2 if opts.master_dtype == "bfloat16" else 4
        lin = sh.linear_layer_params * sh.n_layers
        rows = sum(r for _, (r, _c) in sh.layer_matrices) * sh.n_layers
        scales = lin / block * 4 if block else rows * 4
        st.weights += lin * 1 + scales - lin * su.param_bytes
        if opts.include_lm_head and sh.head_params:
            st.weights += sh.head_params * (1 + 4 / max(block, 1) - su.param_bytes)
        st.cache = [0.0] * sh.n_layers  # the dequantised weights are not autocast-cached leaves
        big = max((r * c for _, (r, c) in sh.layer_matrices), default=0)
        st.fwd_ws = [w + big * (4 + su.compute_bytes) for w in st.fwd_ws]
        st.bwd_ws = [(a + big * (4 + su.compute_bytes), b + big * (4 + su.compute_bytes)) for a, b in st.bwd_ws]
        # the update runs one layer at a time on dequantised masters (and upcast gradients)
        st.opt_ws += sh.linear_layer_params * (master + 4)
        st.dequant_bytes += lin * (1 + su.compute_bytes) * 3  # forward, backward, write-back
        st.notes.append(f"int8-weights: decoder projections stored int8 + an fp32 scale per {block or 'row'} columns; "
                        "gradients in the model's dtype; one layer's masters exist during its update")


@hookimpl
def hf_lowmem_register(register):
    register(Int8Weights())
