"""Model anatomy, in one place: where a Hugging Face causal LM keeps its decoder, its decoder layers, final
norm, input embedding and LM head. Works from the module structure, not from one hard-coded class, so
Llama, Mistral, Qwen2 and their relatives are covered. The planner counts parameters with it, the
plugins find the layers to checkpoint or offload with it, and the streaming engine decomposes the model
into the blocks it streams (:func:`find_anatomy`).

Importing this module imports no torch; the functions do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_lowmem.errors import PluginError

#: where the decoder keeps its layers (a ``ModuleList``), relative to the decoder
LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers")
#: where the decoder keeps its final norm
NORM_PATHS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "decoder.norm")


def unwrap(model: Any) -> Any:
    """The model inside its distributed and compile wrappers (DDP, DataParallel, FSDP, DeepSpeed,
    ``torch.compile``): accelerate's ``extract_model_from_parallel``."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_torch_compile=False)


def _get(module: Any, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def decoder(model: Any) -> Any:
    """The decoder of a causal LM (``get_decoder()``, else ``model.model``), or ``None``."""
    base = unwrap(model)
    get = getattr(base, "get_decoder", None)
    if callable(get):
        try:
            found = get()
        except Exception:  # noqa: BLE001 - some wrappers raise for models without a decoder
            found = None
        if found is not None:
            return found
    return getattr(base, "model", None)


def layer_list(model: Any):
    """The ``ModuleList`` of decoder layers (at :data:`LAYER_PATHS` on the decoder, or on the model itself),
    or ``None``."""
    from torch import nn

    for base in (decoder(model), unwrap(model)):
        if base is None:
            continue
        for path in LAYER_PATHS:
            found = _get(base, path)
            if isinstance(found, nn.ModuleList) and len(found):
                return found
    return None


def decoder_layers(model: Any) -> list:
    """The repeated decoder blocks, in order: the :func:`layer_list`, else the blocks transformers marks as
    ``GradientCheckpointingLayer``, else the first ``ModuleList`` of more than one module of one type.
    Empty when there is none."""
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = layer_list(model)
    if layers is not None:
        return list(layers)
    found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if found:
        return found
    for mods in model.modules():
        if isinstance(mods, nn.ModuleList) and len(mods) > 1 and len({type(m) for m in mods}) == 1:
            return list(mods)
    return []


def final_norm(model: Any):
    """The norm after the last decoder layer, or ``None``."""
    from torch import nn

    base = decoder(model)
    return next((m for p in NORM_PATHS if base is not None and isinstance(m := _get(base, p), nn.Module)), None)


def embeddings(model: Any):
    """The input embedding module, or ``None``."""
    get = getattr(unwrap(model), "get_input_embeddings", None)
    return get() if callable(get) else None


def lm_head(model: Any):
    """The output (LM head) module, or ``None``."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    return get() if callable(get) else None


# ---- the streaming engine's decomposition -------------------------------------------------------------
@dataclass
class Block:
    """A unit the engine streams: a name, the module run for it, and the parameters it owns
    (``params``: local name -> Parameter; a tied parameter is owned by the first block that uses it)."""

    name: str
    module: Any
    params: dict = field(default_factory=dict)
    #: local name -> Parameter used by this block but owned (and updated) by an earlier block
    shared: dict = field(default_factory=dict)

    def all_params(self) -> dict:
        return {**self.params, **self.shared}


@dataclass
class Anatomy:
    model: Any
    base: Any
    embed: Any
    layers: Any
    norm: Any
    head: Any
    blocks: list[Block]
    #: modules of ``base`` outside embed/layers/norm (e.g. rotary embeddings): buffers only
    extras: list

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_anatomy(model: Any) -> Anatomy:
    """Decompose ``model`` into the blocks the streaming engine schedules (embedding, each layer, final
    norm + head); raise :class:`PluginError` saying what is missing when it is not a causal LM whose decoder
    layers are a ``ModuleList``."""
    from torch import nn

    name = type(model).__name__
    base = decoder(model)
    if base is None:
        raise PluginError(f"{name}: cannot find the decoder (model.get_decoder() / model.model)")
    layers = layer_list(model)
    if layers is None:
        raise PluginError(f"{name}: the streaming engine needs decoder layers in a ModuleList "
                          f"(looked for {', '.join(LAYER_PATHS)} on {type(base).__name__})")
    embed, head = embeddings(model), lm_head(model)
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise PluginError(f"{name}: the streaming engine needs an nn.Embedding input and an nn.Linear LM head")
    norm = final_norm(model)

    known = {id(embed), id(layers), id(head)} | ({id(norm)} if norm is not None else set())
    extras = [m for m in base.children() if id(m) not in known]
    extra_params = [n for m in extras for n, _ in m.named_parameters()]
    if extra_params:
        raise PluginError(f"{name}: parameters outside the embedding, layers, final norm and head are not supported "
                          f"by the streaming engine yet: {extra_params[:5]}")
    covered = {id(p) for m in (embed, layers, head, *([norm] if norm is not None else [])) for p in m.parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise PluginError(f"{name}: parameters the streaming engine does not know where to run: {stray[:5]}")

    owned: set[int] = set()
    blocks: list[Block] = []

    def make(bname: str, module, named) -> Block:
        b = Block(bname, module)
        for local, p in named:
            if id(p) in owned:
                b.shared[local] = p
            else:
                owned.add(id(p))
                b.params[local] = p
        blocks.append(b)
        return b

    make("embed", embed, list(embed.named_parameters()))
    for i, layer in enumerate(layers):
        make(f"layer{i}", layer, list(layer.named_parameters()))
    head_named = [(f"head.{n}", p) for n, p in head.named_parameters()]
    if norm is not None:
        head_named = [(f"norm.{n}", p) for n, p in norm.named_parameters()] + head_named
    make("head", nn.ModuleDict({"norm": norm if norm is not None else nn.Identity(), "head": head}), head_named)
    _check_no_dropout(model)
    return Anatomy(model, base, embed, layers, norm, head, blocks, extras)


def _check_no_dropout(model: Any) -> None:
    """Recomputing a layer in backward must reproduce its forward; dropout would need the RNG replayed."""
    from torch import nn

    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        v = getattr(cfg, key, 0.0) if cfg is not None else 0.0
        if isinstance(v, (int, float)) and v > 0:
            raise PluginError(f"the streaming engine recomputes layers in backward and does not support dropout yet; "
                              f"set config.{key}=0.0 (it is {v})")
    for n, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise PluginError(f"the streaming engine does not support dropout yet ({n} has p={m.p})")

