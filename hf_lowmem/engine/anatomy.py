"""Find the parts of a Hugging Face causal LM the streaming engine schedules: the input embedding, the
decoder layers (a ``ModuleList``), the final norm and the LM head. Works from the module structure, not
from one hard-coded class, so Llama, Mistral, Qwen2 and their relatives are covered."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lowmem.errors import PluginError

_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers")
_NORM_PATHS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "decoder.norm")


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class Block:
    """A unit the engine streams: a name, the module run for it, and the parameters it owns
    (``params``: local name -> Parameter; a tied parameter is owned by the first block that uses it)."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    #: local name -> Parameter used by this block but owned (and updated) by an earlier block
    shared: dict[str, nn.Parameter] = field(default_factory=dict)

    def all_params(self) -> dict[str, nn.Parameter]:
        return {**self.params, **self.shared}


@dataclass
class Anatomy:
    model: nn.Module
    base: nn.Module
    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module | None
    head: nn.Linear
    blocks: list[Block]
    #: modules of ``base`` outside embed/layers/norm (e.g. rotary embeddings): buffers only
    extras: list[nn.Module]

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_anatomy(model: nn.Module) -> Anatomy:
    """Decompose ``model``; raise :class:`PluginError` saying what is missing when it is not a causal LM
    whose decoder layers are a ``ModuleList``."""
    name = type(model).__name__
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if base is None:
        raise PluginError(f"{name}: cannot find the decoder (model.get_decoder() / model.model)")
    layers = next((m for p in _LAYER_PATHS if isinstance(m := _get(base, p), nn.ModuleList)), None)
    if layers is None or len(layers) == 0:
        raise PluginError(f"{name}: the streaming engine needs decoder layers in a ModuleList "
                          f"(looked for {', '.join(_LAYER_PATHS)} on {type(base).__name__})")
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear):
        raise PluginError(f"{name}: the streaming engine needs an nn.Embedding input and an nn.Linear LM head")
    norm = next((m for p in _NORM_PATHS if isinstance(m := _get(base, p), nn.Module)), None)

    known = {id(embed), id(layers), id(head)} | ({id(norm)} if norm is not None else set())
    extras = [m for m in base.children() if id(m) not in known]
    extra_params = [n for m in extras for n, _ in m.named_parameters()]
    if extra_params:
        raise PluginError(f"{name}: parameters outside the embedding, layers, final norm and head are not supported "
                          f"by the streaming engine yet: {extra_params[:5]}")
    covered = {id(p) for m in (embed, layers, head, *( [norm] if norm is not None else [])) for p in m.parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise PluginError(f"{name}: parameters the streaming engine does not know where to run: {stray[:5]}")

    owned: set[int] = set()
    blocks: list[Block] = []

    def make(bname: str, module: nn.Module, named: list[tuple[str, nn.Parameter]]) -> Block:
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


def _check_no_dropout(model: nn.Module) -> None:
    """Recomputing a layer in backward must reproduce its forward; dropout would need the RNG replayed."""
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        v = getattr(cfg, key, 0.0) if cfg is not None else 0.0
        if isinstance(v, (int, float)) and v > 0:
            raise PluginError(f"the streaming engine recomputes layers in backward and does not support dropout yet; "
                              f"set config.{key}=0.0 (it is {v})")
    for n, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise PluginError(f"the streaming engine does not support dropout yet ({n} has p={m.p})")


def block_param_bytes(block: Block, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in block.params.values()) * torch.empty((), dtype=dtype).element_size()
