"""``chunked-loss``: the causal-LM loss without ever materialising the full logits.

The stock loss computes ``logits = lm_head(hidden)`` for every token (tokens x vocab, upcast to fp32:
1 GiB at 8,192 tokens and a 32k vocabulary, and as much again for its gradient). This plugin runs the
decoder (``model.get_decoder()``), then computes the LM head and the cross-entropy in chunks of
``chunk_size`` tokens inside one ``torch.autograd.Function``: forward keeps only the per-chunk loss sums;
backward recomputes each chunk's logits and turns them into the gradients of the hidden states and of the
head's weight (accumulated in fp32) right away. Peak extra memory is one chunk of logits.

The result is scaled exactly like transformers' ``ForCausalLMLoss`` (labels shifted by one, ``-100``
ignored, logits upcast to fp32; the sum divided by ``num_items_in_batch`` when the Trainer gives it, else
the mean), so the Trainer's gradient-accumulation arithmetic is unchanged and losses equal plain training
up to float rounding. Final-logit soft-capping (Gemma 2) and logit scaling (Cohere, Granite) are applied
per chunk. A head that is not a plain ``nn.Linear`` (e.g. stored in int8) goes through the same chunks
with ``torch.utils.checkpoint`` per chunk instead of the fused function.

Kind: ``offload``. It is an activation-memory technique like checkpointing, and ``offload`` is the one kind
of which several plugins can be selected at once, so it combines with an attention plugin (``sdpa``,
``flash-attn``) and with checkpointing.

Mixed precision: with ``bf16=True`` / ``fp16=True`` the Trainer (through accelerate) runs the model's own
``forward`` under ``torch.autocast``; calling the decoder directly bypasses that wrapper, so this plugin enters
the same autocast region itself (dtype from the arguments). Without it an fp32 model trained with
``bf16=True`` would run its whole decoder in fp32: twice the activation memory, and for grouped-query
attention on CUDA the SDPA math kernel, which materialises a (batch x heads x seq x seq) fp32 matrix per layer
(no fused CUDA kernel takes fp32 with grouped KV heads).

Single-process only: it calls the decoder directly, which would bypass a DDP/FSDP wrapper's forward.

Under TRL's ``SFTTrainer`` (``SFTConfig`` arguments) the plugin replaces SFTTrainer's own loss, so it also
computes what SFTTrainer logs from it, from the chunks' logits (the full logits still never exist): the
mean ``entropy`` of the predicted distribution and ``mean_token_accuracy`` over the tokens with a label, and
the running ``num_tokens``, averaged over each logging interval as SFTTrainer does. An ``SFTConfig`` whose
``loss_type`` is not ``"nll"`` is refused (the plugin computes the NLL only).
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.anatomy import decoder, lm_head, unwrap
from hf_lowmem.context import mixed_precision_dtype
from hf_lowmem.errors import PluginError

NAME = "chunked-loss"
IGNORE_INDEX = -100


@dataclass
class ChunkedLossOptions:
    #: tokens per chunk: peak extra memory is chunk_size x vocab x 4 bytes (x2 in backward)
    chunk_size: int = 1024

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1 (tokens per chunk), got {self.chunk_size!r}")


def _make_function():
    import torch
    import torch.nn.functional as F

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """sum over valid tokens of CE(post(h @ W.T + b), label) / denom, one chunk of rows at a time."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, denom, chunk_size, post, stats=None):
            dev = hidden.device.type
            ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk_size):
                lab = labels[s:s + chunk_size]
                logits = post(F.linear(hidden[s:s + chunk_size], weight, bias).float())
                total = total + F.cross_entropy(logits, lab, ignore_index=IGNORE_INDEX, reduction="sum")
                if stats is not None:
                    stats.add(logits, lab)
            ctx.save_for_backward(hidden, weight, bias, labels, denom)
            ctx.chunk_size, ctx.post = chunk_size, post
            return total / denom

        @staticmethod
        def backward(ctx, grad_out):
            hidden, weight, bias, labels, denom = ctx.saved_tensors
            enabled, dtype = ctx.autocast
            dev = hidden.device.type
            want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
            grad_h = torch.zeros_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            scale = (grad_out.float() / denom.float())
            for s in range(0, hidden.shape[0], ctx.chunk_size):
                lab = labels[s:s + ctx.chunk_size]
                valid = lab != IGNORE_INDEX
                h = hidden[s:s + ctx.chunk_size].detach()
                with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled) if enabled else _null():
                    raw = F.linear(h, weight.detach(), None if bias is None else bias.detach())  # the recompute
                logits = raw.float()
                if ctx.post is not _identity:
                    logits.requires_grad_(True)
                    with torch.enable_grad():
                        post_logits = ctx.post(logits)
                else:
                    post_logits = logits
                # d CE_sum / d post_logits = (softmax - onehot) on rows with a label, 0 elsewhere
                with torch.no_grad():
                    g = torch.softmax(post_logits.detach(), dim=-1)
                    vf = valid.to(g.dtype).unsqueeze(1)
                    g.scatter_add_(1, lab.clamp_min(0).unsqueeze(1), -vf)
                    # rows without a label get exactly 0, as cross_entropy's own backward gives them, even when
                    # the scale is inf (a window without any label: the loss is 0/0 there too)
                    g.mul_(scale).masked_fill_(~valid.unsqueeze(1), 0.0)
                if ctx.post is not _identity:  # chain rule through soft-capping / scaling
                    (g,) = torch.autograd.grad(post_logits, logits, g)
                g_raw = g.to(raw.dtype)
                del raw, logits, post_logits, g
                w = weight.detach()
                with torch.no_grad():
                    if want_h:
                        grad_h[s:s + ctx.chunk_size] = g_raw @ w.to(g_raw.dtype)
                    if want_w:  # fp32 accumulator; the chunk's product stays in the compute dtype
                        grad_w.add_(g_raw.t() @ h.detach().to(g_raw.dtype))
                    if want_b:
                        grad_b.add_(g_raw.float().sum(0))
            return (grad_h, grad_w.to(weight.dtype) if want_w else None,
                    grad_b.to(bias.dtype) if want_b else None, None, None, None, None, None)

    return ChunkedLinearCrossEntropy


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _identity(x):
    return x


_FN = None


class TokenStats:
    """What TRL's ``SFTTrainer`` logs besides the loss, gathered chunk by chunk from the logits the loss
    computes anyway: over the tokens with a label, the summed entropy of the predicted distribution and the
    number whose most likely token is the label."""

    def __init__(self):
        self.tokens, self.entropy, self.correct = 0, 0.0, 0

    def add(self, logits, labels) -> None:
        import torch

        with torch.no_grad():
            valid = labels != IGNORE_INDEX
            if not bool(valid.any()):
                return
            lg = logits.detach()[valid].float()
            logp = torch.log_softmax(lg, dim=-1)
            self.entropy += float(-(logp.exp() * logp).sum())
            self.correct += int((lg.argmax(-1) == labels[valid]).sum())
            self.tokens += int(valid.sum())


def chunked_linear_cross_entropy(hidden, weight, bias, labels, denom, chunk_size: int = 1024, post=None, stats=None):
    """``sum CE(post(hidden @ weight.T + bias), labels) / denom`` over rows with a label != -100, computed
    ``chunk_size`` rows at a time; backward recomputes each chunk. ``hidden`` is (N, H), ``labels`` (N,),
    ``denom`` a scalar tensor. ``stats``: a :class:`TokenStats` to add each chunk's entropy and accuracy to."""
    global _FN
    if _FN is None:
        _FN = _make_function()
    return _FN.apply(hidden, weight, bias, labels, denom, chunk_size, post or _identity, stats)


def _logit_post(config):
    """The function the model applies to the LM head's output before the loss (identity for Llama)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(cfg, "final_logit_softcapping", None)
    mul = getattr(cfg, "logit_scale", None)  # Cohere multiplies
    div = getattr(cfg, "logits_scaling", None)  # Granite divides
    if not cap and mul in (None, 1, 1.0) and div in (None, 1, 1.0):
        return _identity

    def post(x):
        import torch

        if mul not in (None, 1, 1.0):
            x = x * mul
        if div not in (None, 1, 1.0):
            x = x / div
        if cap:
            x = torch.tanh(x / cap) * cap
        return x

    return post


def _autocast_region(device_type: str, dtype):
    """``torch.autocast(device_type, dtype)``, or a no-op when ``dtype`` is ``None`` or autocast is already on."""
    import torch

    if dtype is None or torch.is_autocast_enabled(device_type):
        return _null()
    return torch.autocast(device_type, dtype=dtype)


def causal_lm_chunked_loss(model, inputs: dict, num_items_in_batch=None, chunk_size: int = 1024, autocast_dtype=None,
                           stats: TokenStats | None = None):
    """The loss ``model(**inputs).loss`` would give, computed without the full logits.

    ``autocast_dtype``: run the decoder and the loss under ``torch.autocast`` of this dtype, as the Trainer's
    mixed precision runs ``model.forward`` (the decoder is called directly here, outside that wrapper);
    ``None``: as called (nothing added). ``stats``: a :class:`TokenStats` that the chunks add to."""
    import torch

    model = unwrap(model)
    device_type = inputs["input_ids"].device.type if torch.is_tensor(inputs.get("input_ids")) else \
        next(model.parameters()).device.type
    with _autocast_region(device_type, autocast_dtype):
        return _chunked_loss(model, inputs, num_items_in_batch, chunk_size, stats)


def _chunked_loss(model, inputs: dict, num_items_in_batch, chunk_size: int, stats=None):
    import torch

    head, base = lm_head(model), decoder(model)
    if head is None or base is None or not hasattr(head, "weight"):
        raise PluginError(f"chunked-loss needs a causal LM with get_decoder() and a linear output head; "
                          f"{type(model).__name__} has none. Drop chunked-loss for this model.")
    labels = inputs.get("labels")
    shift_labels = inputs.get("shift_labels")
    if labels is None and shift_labels is None:
        raise PluginError("chunked-loss needs `labels` in the batch (the data collator must provide them)")
    kwargs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels", "num_items_in_batch")}
    kwargs["use_cache"] = False
    out = base(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        denom = (shift_labels != IGNORE_INDEX).sum().to(torch.float32)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    post = _logit_post(model.config)
    if type(head) is torch.nn.Linear:
        return chunked_linear_cross_entropy(hidden, head.weight, head.bias, shift_labels, denom, chunk_size, post, stats)
    return chunked_module_cross_entropy(head, hidden, shift_labels, denom, chunk_size, post, stats)


def chunked_module_cross_entropy(head, hidden, labels, denom, chunk_size: int = 1024, post=None, stats=None):
    """The same loss for any head module (a quantized Linear, say): each chunk runs under non-reentrant
    ``torch.utils.checkpoint``, so its logits are freed after forward and recomputed in backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    post = post or _identity

    def chunk_loss(h, lab):
        return F.cross_entropy(post(head(h).float()), lab, ignore_index=IGNORE_INDEX, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_size):
        h, lab = hidden[s:s + chunk_size], labels[s:s + chunk_size]
        total = total + checkpoint(chunk_loss, h, lab, use_reentrant=False)
        if stats is not None:  # once more without autograd: the checkpointed chunk keeps no logits
            with torch.no_grad():
                stats.add(post(head(h.detach()).float()), lab)
    return total / denom


def not_causal_lm(model) -> str | None:
    """Why ``model`` is not a causal LM whose loss this plugin computes (labels shifted by one, every position
    predicting the next token), or ``None`` when it is one. An encoder-decoder model (T5, BART) computes its
    loss on the decoder's output for the decoder's own inputs, a masked LM (BERT) on unshifted labels: the
    chunked loss would silently be another loss there (T5: 19.9 instead of 5.3 at the first step)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = unwrap(model)
    if callable(getattr(base, "get_base_model", None)):  # a PEFT wrapper
        base = base.get_base_model()
    cfg = getattr(base, "config", None)
    name = type(base).__name__
    if getattr(cfg, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model (its loss is over the decoder's outputs, not shifted inputs)"
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name in causal or name.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    if name.endswith("ForMaskedLM"):
        return f"{name} is a masked LM (its labels are not shifted: each position predicts itself)"
    return f"{name} is not a causal LM (a *ForCausalLM model)"


#: what TRL's SFTTrainer logs from its own loss computation, which chunked-loss replaces: it logs them itself
SFT_METRICS = ("entropy", "mean_token_accuracy", "num_tokens")


def _is_sft(args) -> bool:
    """Whether these are TRL ``SFTConfig`` arguments (upgraded ones included)."""
    return any(c.__name__ == "SFTConfig" for c in type(args).__mro__)


def _tokens_in(inputs: dict) -> int:
    """Tokens of a micro-batch as SFTTrainer counts them for ``num_tokens`` (padding excluded)."""
    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    if inputs.get("position_ids") is not None:
        return int(inputs["position_ids"].size(1))
    return int(inputs["input_ids"].numel())


def _sft_metrics_callback(ctx):
    """Adds SFTTrainer's training metrics, averaged over the micro-batches since the previous log as SFTTrainer
    averages them, to each training log (and to the entry the Trainer has just put in ``log_history``)."""
    from transformers import TrainerCallback

    class SFTMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            slot = ctx.state.get(NAME)
            if not logs or "loss" not in logs or slot is None:
                return
            new = {}
            for key in ("entropy", "mean_token_accuracy"):
                if slot[key] and key not in logs:
                    new[key] = sum(slot[key]) / len(slot[key])
                slot[key].clear()
            if "num_tokens" not in logs:
                new["num_tokens"] = float(slot["num_tokens"])
            logs.update(new)
            last = state.log_history[-1] if state.log_history else None
            if last is not None and last.get("step") == state.global_step and "loss" in last:
                last.update({k: v for k, v in new.items() if k not in last})

    return SFTMetrics()


class ChunkedLoss(Plugin):
    name, kind, options, lossless, modes = NAME, "offload", ChunkedLossOptions, True, ("single",)
    help = ("causal-LM loss computed in token chunks (LM head + cross-entropy, recomputed in backward): "
            "the full logits are never materialised")
    incompatible = {"stream": "redundant: the stream engine computes the loss in token chunks itself (its option "
                              "loss_chunk_tokens) and would never call chunked-loss; drop chunked-loss"}

    def validate(self, ctx):
        if getattr(ctx.args, "label_smoothing_factor", 0.0):
            raise PluginError("chunked-loss computes the plain cross-entropy; it cannot apply label_smoothing_factor="
                              f"{ctx.args.label_smoothing_factor}. Set label_smoothing_factor=0 or drop chunked-loss.")
        loss_type = getattr(ctx.args, "loss_type", None)
        if _is_sft(ctx.args) and loss_type not in (None, "nll"):
            raise PluginError(f"chunked-loss computes the plain next-token NLL, not SFTConfig's loss_type={loss_type!r}; "
                              "set loss_type='nll' or drop chunked-loss.")

    def callbacks(self, ctx):
        if not _is_sft(ctx.args):
            return []
        ctx.state[NAME] = {"entropy": [], "mean_token_accuracy": [], "num_tokens": 0}
        return [_sft_metrics_callback(ctx)]

    def prepare_model(self, ctx, model):
        why = not_causal_lm(model)
        if why is not None:
            raise PluginError(f"chunked-loss computes the causal-LM loss (labels shifted by one) and {why}: it would "
                              "train on a wrong loss. Drop chunked-loss from lowmem_offload for this model.")
        return None

    def compute_loss(self, ctx, model, inputs, num_items_in_batch):
        slot = ctx.state.get(NAME)  # under TRL's SFTTrainer: the metrics its own loss would have logged
        stats = TokenStats() if slot is not None and model.training else None
        loss = causal_lm_chunked_loss(model, inputs, num_items_in_batch, ctx.options(NAME).chunk_size,
                                      autocast_dtype=mixed_precision_dtype(ctx.args), stats=stats)
        if stats is not None:
            slot["entropy"].append(stats.entropy / stats.tokens if stats.tokens else 0.0)
            slot["mean_token_accuracy"].append(stats.correct / stats.tokens if stats.tokens else 0.0)
            slot["num_tokens"] += _tokens_in(inputs)
        return loss

    def memory_model(self, plan, st):
        """Forward keeps per-chunk loss sums (one chunk's logits, their fp32 copy and log-softmax at a time);
        backward allocates the hidden-state gradient and an fp32 head-weight gradient, then per chunk
        recomputes the logits (compute dtype), their fp32 copy, the softmax gradient and its cast back."""
        su = plan.setup
        C = min(int(self.options_for(plan).chunk_size), su.tokens)
        V, H, T = plan.shape.vocab, plan.shape.hidden, su.tokens
        e = su.compute_bytes
        per_row_fwd = (e + 4 + 4) if e != 4 else 8
        per_row_bwd = (2 * e + 8) if e != 4 else 8
        cast = 2 * V * H if su.amp else 0  # autocast's bf16 copy of the head weight, while a chunk runs
        st.logits_fwd = C * V * per_row_fwd + cast
        st.logits_bwd = T * H * e + V * H * 4 + C * V * per_row_bwd + cast
        st.head_cache = 0.0


@hookimpl
def hf_lowmem_register(register):
    register(ChunkedLoss())
