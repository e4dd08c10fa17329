"""``gradient-checkpointing``: recompute decoder layers in backward instead of keeping their activations.

Option ``every_n`` (default 1) checkpoints every n-th decoder layer (layers 0, n, 2n, ...): ``1`` is all
layers, ``2`` half of them (about half the activation memory saved for ~half the recompute cost).

The plugin patches the model *instance*: each chosen layer gets an instance ``forward`` that runs the
layer's own forward under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, and only while
training with gradients enabled (evaluation and generation run the layer as is). KV-cache arguments are
dropped inside checkpointed layers, since the recompute would write the cache a second time.

With a plugin that moves saved tensors through saved-tensor hooks (one that provides
``"saved-tensor-hooks"``, such as ``activation-offload``), checkpointed layers use the reentrant variant
instead, because that one saves the layer's input through ``ctx.save_for_backward``: those hooks then move
exactly the checkpoint inputs (one hidden state per layer) to host memory, which is the combination that
pays off. Same arithmetic either way: the losses equal plain training.

The Trainer's own checkpointing (``gradient_checkpointing=True``; ``activation_checkpointing=True`` in
transformers 5, where ``gradient_checkpointing`` is its alias) would checkpoint the same layers a second time.
When it is on only because the arguments' class turns it on by default (TRL's ``SFTConfig`` does), the
plugin takes over: it turns the Trainer's off for the run and says so once (info). When the user turned it
on, the run is refused with the argument to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from hf_lowmem import Plugin, hookimpl
from hf_lowmem.anatomy import decoder_layers
from hf_lowmem.errors import PluginError

logger = logging.getLogger("hf_lowmem")

NAME = "gradient-checkpointing"
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class CheckpointingOptions:
    #: checkpoint every n-th decoder layer (1 = every layer)
    every_n: int = 1

    def __post_init__(self):
        if not isinstance(self.every_n, int) or isinstance(self.every_n, bool) or self.every_n < 1:
            raise ValueError(f"every_n must be an integer >= 1 (1 = checkpoint every layer), got {self.every_n!r}")


def _checkpointed_forward(layer, *args, **kwargs):
    import torch
    from torch.utils.checkpoint import checkpoint

    inner = layer._hf_lowmem_inner_forward
    if not (layer.training and torch.is_grad_enabled()):
        return inner(*args, **kwargs)
    for key in _CACHE_KWARGS:
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if layer._hf_lowmem_reentrant:
        # Reentrant: the layer input is saved with save_for_backward, where activation-offload's
        # saved-tensor hooks see it. Other arguments are bound (they need no gradient).
        if args and torch.is_tensor(args[0]) and args[0].requires_grad:
            return checkpoint(partial(inner, **kwargs), *args, use_reentrant=True)
        hidden = kwargs.get("hidden_states")
        if not args and torch.is_tensor(hidden) and hidden.requires_grad:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return checkpoint(lambda h: inner(hidden_states=h, **rest), hidden, use_reentrant=True)
    return checkpoint(inner, *args, use_reentrant=False, **kwargs)


def apply_checkpointing(model, every_n: int = 1, reentrant: bool = False) -> list[int]:
    """Checkpoint every ``every_n``-th decoder layer of ``model`` (instance patch). Returns the layer
    indices checkpointed. Calling it again re-applies with the new settings."""
    layers = decoder_layers(model)
    if not layers:
        raise PluginError(
            f"gradient-checkpointing found no decoder layers in {type(model).__name__}: it needs a transformers "
            "decoder (layers under model.model.layers or GradientCheckpointingLayer blocks)"
        )
    chosen = []
    for i, layer in enumerate(layers):
        remove_checkpointing(layer)
        if i % every_n:
            continue
        layer._hf_lowmem_inner_forward = layer.forward  # the class forward, bound (or an earlier instance patch)
        layer._hf_lowmem_reentrant = reentrant
        layer.forward = partial(_checkpointed_forward, layer)
        chosen.append(i)
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recompute
    return chosen


def remove_checkpointing(layer) -> None:
    inner = layer.__dict__.pop("_hf_lowmem_inner_forward", None)
    if inner is not None:
        layer.__dict__.pop("forward", None)
        if getattr(inner, "__self__", None) is not layer:  # an earlier instance-level forward: restore it
            layer.forward = inner
    layer.__dict__.pop("_hf_lowmem_reentrant", None)


_TRAINER_FLAGS = ("activation_checkpointing", "gradient_checkpointing")  # transformers 5's name first, then its alias


def trainer_checkpointing(args) -> tuple[bool, bool, str]:
    """Whether the Trainer's own checkpointing is on in ``args``, whether only because their class turns it
    on by default (TRL's ``SFTConfig``: ``gradient_checkpointing=True``), and its name in the user's terms:
    ``"activation_checkpointing"`` where transformers has that argument, else ``"gradient_checkpointing"``."""
    import dataclasses

    flags = [f for f in _TRAINER_FLAGS if hasattr(args, f)]
    on = any(bool(getattr(args, f)) for f in flags)
    fields = {f.name: f for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
    from_default = on and any(f in fields and fields[f].default is True for f in flags)
    return on, from_default, (flags[0] if flags else "gradient_checkpointing")


def args_class_name(args) -> str:
    """The user's arguments class (``SFTConfig``, not the upgraded ``LowMemSFTConfig``)."""
    name = type(args).__name__
    return name[len("LowMem"):] if name.startswith("LowMem") and len(name) > 6 else name


class GradientCheckpointing(Plugin):
    name, kind, options, lossless = NAME, "offload", CheckpointingOptions, True
    help = "activation (gradient) checkpointing of every n-th decoder layer, non-reentrant, on the model instance"

    def validate(self, ctx):
        on, from_default, _ = trainer_checkpointing(ctx.args)
        if on and not from_default:
            flags = [f for f in reversed(_TRAINER_FLAGS) if hasattr(ctx.args, f)]  # the older name first
            raise PluginError(
                f"{' / '.join(f + '=True' for f in flags)} turns on the Trainer's own checkpointing, and the "
                "gradient-checkpointing plugin would checkpoint the same layers again: set "
                f"{' or '.join(f + '=False' for f in flags)} (--{flags[0]} false) and keep the plugin (it adds every_n "
                "and composes with activation-offload), or drop gradient-checkpointing from lowmem_offload."
            )

    def prepare_model(self, ctx, model):
        on, from_default, flag = trainer_checkpointing(ctx.args)
        if on and from_default:  # TRL's SFTConfig default: the user never asked for it; the plugin takes over
            for f in _TRAINER_FLAGS:
                if hasattr(ctx.args, f):
                    setattr(ctx.args, f, False)
            logger.info("gradient-checkpointing: %s turns on %s by default; the plugin checkpoints the layers instead "
                        "(the Trainer's own checkpointing is off for this run)", args_class_name(ctx.args), flag)
        opts = ctx.options(NAME)
        reentrant = ctx.provides("saved-tensor-hooks")
        chosen = apply_checkpointing(model, opts.every_n, reentrant=reentrant)
        ctx.state[NAME] = {"layers": chosen, "reentrant": reentrant}
        logger.info("gradient-checkpointing: %d of %d decoder layers checkpointed%s", len(chosen),
                    len(decoder_layers(model)), " (reentrant, inputs offloaded)" if reentrant else "")
        return None

    def plan_variants(self):
        return [{}, {"every_n": 2}, {"every_n": 4}]

    def memory_model(self, plan, step):
        from hf_lowmem.planner import checkpoint_layers

        checkpoint_layers(plan, step, self.options_for(plan).every_n)


@hookimpl
def hf_lowmem_register(register):
    register(GradientCheckpointing())
