"""Adam-mini (the ``adam-mini`` package, version 1.1.x) as the hf-lowmem plugin ``adam-mini``.

Adam-mini (Zhang et al., 2024, "Use fewer learning rates to gain more") keeps Adam's first moment in full
but replaces the second moment by one mean value per block: per attention head for queries and keys, per
output neuron (row) for values, the attention output, the MLP, the embeddings and the LM head, and one per
tensor for norms. Its state is therefore about half of AdamW's (4 bytes per parameter plus a few floats per
row), and it is meant to run at AdamW's learning rate.

Adam-mini finds the blocks by parameter *names* (``embed``/``lm_head``/``q_proj``/``k_proj``/``v_proj``/
``o_proj``/``mlp``...), which is what Llama, Mistral, Qwen2 and other Hugging Face decoders use. The plugin
builds it from ``model.named_parameters()`` with the model config's hidden size and head counts and fixes
three things on the instance:

* ``head_numel`` is ``head_dim * hidden_size`` (Adam-mini derives it as ``hidden^2 / heads``, wrong for
  models whose ``head_dim`` is not ``hidden / heads``);
* ``world_size`` is the torch.distributed world size (Adam-mini reads ``torch.cuda.device_count()``, so a
  single process on a machine with several GPUs would call ``all_gather`` without a process group);
* each parameter's weight decay follows the Trainer's decay names (Adam-mini's own rule is a name match on
  ``norm``/``ln``/``bias``).

Not supported: FSDP and DeepSpeed (not tested here; Adam-mini documents its own sharded use), the ``stream``
engine (it brings its own optimizer).
"""

from __future__ import annotations

import logging

from hf_lowmem import hookimpl
from hf_lowmem.errors import PluginError
from hf_lowmem.registry import PluginInfo

logger = logging.getLogger("hf_lowmem.adam_mini")
NAME = "adam-mini"


@hookimpl
def hf_lowmem_register(register):
    register(PluginInfo(
        name=NAME, kind="optimizer", requires=("adam_mini",), extra="adam-mini", lossless=False,
        help="Adam-mini: Adam's first moment, one second-moment value per head/neuron block (about half AdamW's state)",
        modes=("single", "ddp"),
        incompatible={"stream": "Adam-mini is built by the Trainer's optimizer hook; the stream engine brings its own "
                                "optimizer. Use Adam-mini without stream"},
    ))


#: eval-loss gap vs AdamW at AdamW's learning rate (x1) and the best multiplier of the grid with its gap, in %
#: (same run as ``hf_lowmem_plugins.apollo.EVIDENCE_SOURCE``)
EVIDENCE = {"x1": 5.54, "best": (1, 5.54)}
_SAID: set = set()


def lr_message(lr: float) -> tuple[int, str]:
    """(logging level, text) logged once at construction: Adam-mini is meant to run at AdamW's learning rate;
    what was measured there."""
    from hf_lowmem_plugins.apollo import evidence_note

    lossy, note = evidence_note(EVIDENCE, lr)
    return (logging.WARNING if lossy else logging.INFO), (
        f"{NAME}: meant to run at AdamW's learning rate ({lr:g} here), with one second-moment value per head or "
        f"neuron block; {note}")


@hookimpl
def hf_lowmem_validate(ctx):
    if ctx.selected("optimizer") != NAME:
        return
    level, msg = lr_message(ctx.args.learning_rate)
    if msg not in _SAID:
        _SAID.add(msg)
        logger.log(level, msg)


def _heads(model) -> tuple[int, int, int, int]:
    """(hidden size, attention heads, key/value heads, head dim) from the model's config."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not hidden or not heads:
        raise PluginError(f"plugin {NAME!r} needs a model config with hidden_size and num_attention_heads "
                          "(Adam-mini groups query and key weights per attention head); choose another optimizer "
                          "for this model")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return hidden, heads, kv, head_dim


@hookimpl
def hf_lowmem_create_optimizer(ctx, model, trainer):
    if ctx.selected("optimizer") != NAME:
        return None
    ctx.info(NAME).import_requirements()
    import torch.distributed as dist
    from adam_mini import Adam_mini

    args = ctx.args
    hidden, heads, kv, head_dim = _heads(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = Adam_mini(named_parameters=named, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                    eps=args.adam_epsilon, weight_decay=args.weight_decay, dim=hidden, n_heads=heads,
                    n_kv_heads=kv, verbose=False)
    opt.head_numel = head_dim * hidden
    opt.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    decay = set(trainer.get_decay_parameter_names(model))
    lower = {n.lower(): n for n, _ in named}
    for group in opt.param_groups:
        group["weight_decay"] = args.weight_decay if lower.get(group["name"]) in decay else 0.0
    logger.info("%s: %d parameter blocks (hidden %d, %d heads, %d kv heads, head_dim %d)", NAME, len(opt.param_groups),
                hidden, heads, kv, head_dim)
    return opt
