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


class GradientCheckpointing(Plugin):
    name, kind, options, lossless = NAME, "offload", CheckpointingOptions, True
    help = "activation (gradient) checkpointing of every n-th decoder layer, non-reentrant, on the model instance"

    def validate(self, ctx):
        if getattr(ctx.args, "gradient_checkpointing", False):
            raise PluginError(
                "gradient_checkpointing=True and the gradient-checkpointing plugin would both checkpoint the layers. "
                "Drop gradient_checkpointing=True (the plugin does the same, adds every_n and composes with "
                "activation-offload), or drop the plugin."
            )

    def prepare_model(self, ctx, model):
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
