"""Model shapes: a causal LM's parameter layout, counted on the ``meta`` device (no weight is allocated or
loaded), from a preset name, a ``config.json``, a model folder, a cached hub id, a config or a model."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable

from hf_lowmem import anatomy
from hf_lowmem.cli_args import looks_local
from hf_lowmem.errors import PluginError
from hf_lowmem.sizes import fmt_count

#: configurations of well-known models, so that planning works offline (values from their config.json)
PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                     tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                     tie_word_embeddings=True, max_position_embeddings=131072),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           tie_word_embeddings=False, max_position_embeddings=2048),
    "llama2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      tie_word_embeddings=False, max_position_embeddings=4096),
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=4096),
    "llama2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=4096),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      tie_word_embeddings=False, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       tie_word_embeddings=False, max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=32768),
}
_ALIASES = {"llama-2-7b": "llama2-7b", "llama2": "llama2-7b", "llama-2-13b": "llama2-13b", "llama-2-70b": "llama2-70b", "llama-3-8b": "llama3-8b",
            "llama3.1-8b": "llama3-8b", "llama-3.2-1b": "llama-1b", "llama3.2-1b": "llama-1b", "llama-3.2-3b": "llama-3b",
            "llama3.2-3b": "llama-3b", "smollm2": "smollm2-135m", "smollm-135m": "smollm2-135m",
            "mistral-7b-v0.1": "mistral-7b", "qwen2.5-0.5b": "qwen2.5-0.5b"}


@dataclass(frozen=True)
class ModelShape:
    """The parameter layout of a causal LM, counted on the meta device. Byte counts elsewhere are
    derived from these numbers; nothing here depends on dtypes."""

    name: str
    model_type: str
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params_total: int
    #: parameters of each decoder layer
    layer_params: tuple[int, ...]
    #: the 2-D weights of one decoder layer: (name, (rows, cols))
    layer_matrices: tuple[tuple[str, tuple[int, int]], ...]
    embed_params: int
    #: LM head parameters not shared with the embedding (0 when tied)
    head_params: int
    #: final norm and anything outside embedding, layers and head
    other_params: int
    #: the decoder layer looks like Llama's (q/k/v/o projections, gated MLP, RMSNorm)
    llama_like: bool = True
    gated_mlp: bool = True
    max_positions: int = 0

    @property
    def linear_layer_params(self) -> int:
        """Parameters of one layer that sit in 2-D weights (projections)."""
        return sum(r * c for _, (r, c) in self.layer_matrices)

    @property
    def largest_param(self) -> int:
        mats = [r * c for _, (r, c) in self.layer_matrices] or [0]
        return max(max(mats), self.embed_params, self.head_params)

    def block_params(self) -> list[int]:
        """[embedding, layer 1..N, final norm + head] as the stream engine schedules them."""
        return [self.embed_params, *self.layer_params, self.head_params + self.other_params]

    def describe(self) -> str:
        gqa = f", {self.n_kv_heads} KV heads" if self.n_kv_heads != self.n_heads else ""
        return (f"{self.name}: {fmt_count(self.params_total)} params ({self.model_type}, {self.n_layers} layers, "
                f"hidden {self.hidden}, MLP {self.intermediate}, {self.n_heads} heads{gqa}, vocab {self.vocab}"
                f"{', tied embeddings' if self.tied else ''})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_params"] = list(self.layer_params)[:1] + (["..."] if self.n_layers > 1 else [])
        d["layer_matrices"] = [[n, list(s)] for n, s in self.layer_matrices]
        return d

    def param_sizes(self) -> Iterable[tuple[str, int]]:
        """(kind, numel) of every parameter tensor: kind is ``layer``, ``vector``, ``embed``, ``head`` or ``other``."""
        vec = self.layer_params[0] - self.linear_layer_params if self.layer_params else 0
        for _ in range(self.n_layers):
            for _, (r, c) in self.layer_matrices:
                yield "layer", r * c
            if vec:
                yield "vector", vec
        yield "embed", self.embed_params
        if self.head_params:
            yield "head", self.head_params
        if self.other_params:
            yield "other", self.other_params

    def mlp_matrices(self) -> list[int]:
        """Sizes of one layer's MLP weight matrices, in layer order."""
        return [r * c for n, (r, c) in self.layer_matrices if is_mlp(n)]

    def attention_matrices(self) -> list[int]:
        """Sizes of one layer's other (attention) weight matrices, in layer order."""
        return [r * c for n, (r, c) in self.layer_matrices if not is_mlp(n)]


def is_mlp(param_name: str) -> bool:
    """Whether a decoder-layer parameter belongs to the MLP (by the names transformers' decoders use)."""
    return bool(re.search(r"mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|fc1|fc2|c_fc|w1|w2|w3", param_name))


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, **overrides: Any):
    """A ``PretrainedConfig`` for a preset name (``llama2-7b``, ``smollm2-135m``, ...)."""
    from transformers import AutoConfig

    key = _preset_key(name)
    if key is None:
        raise PluginError(f"unknown model preset {name!r}; presets: {', '.join(preset_names())}")
    kw = dict(PRESETS[key])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.name_or_path = key
    return cfg


def _preset_key(name: str) -> str | None:
    k = str(name).strip().lower().replace("_", "-")
    k = k.split("/")[-1]
    k = _ALIASES.get(k, k)
    return k if k in PRESETS else None


def load_model_shape(spec: Any, **config_overrides: Any) -> ModelShape:
    """Read a model's parameter layout without loading weights.

    ``spec``: a :class:`ModelShape`; a model object (its parameters are counted where they are); a
    ``PretrainedConfig``; or a string: a preset name (:data:`PRESETS`), a ``config.json`` path, a model
    folder, or a hub id (read from the local cache when offline). ``config_overrides`` change config
    fields first (e.g. ``num_hidden_layers=16`` for a slice)."""
    layers = config_overrides.get("num_hidden_layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise PluginError(f"num_hidden_layers={layers!r}: the number of decoder layers to plan must be an integer >= 1")
    if isinstance(spec, ModelShape):
        if config_overrides:
            raise PluginError("config overrides need a config, not a ModelShape")
        return spec
    if hasattr(spec, "parameters") and hasattr(spec, "config") and not config_overrides:
        return shape_from_model(spec)
    if hasattr(spec, "to_dict") and hasattr(spec, "model_type"):  # a PretrainedConfig
        cfg = spec
        if config_overrides:
            cfg = type(cfg).from_dict({**cfg.to_dict(), **config_overrides})
        return shape_from_config(cfg)
    if hasattr(spec, "parameters") and hasattr(spec, "config"):
        return load_model_shape(spec.config, **config_overrides)
    if not isinstance(spec, (str, os.PathLike)):
        raise PluginError(f"cannot read a model shape from {type(spec).__name__}; give a preset name, a config.json,"
                          " a model folder or a PretrainedConfig")
    text = os.fspath(spec)
    if _preset_key(text) is not None and not os.path.exists(text):
        return shape_from_config(preset_config(text, **config_overrides))
    if looks_local(text) and not os.path.exists(os.path.expanduser(text)):  # never asked of the Hub
        raise PluginError(f"{text!r}: no such file or folder. Give a config.json, a model folder with one, a hub id "
                          f"(owner/name), or a preset: {', '.join(preset_names())}")
    text = os.path.expanduser(text)
    from transformers import AutoConfig

    try:
        if os.path.isfile(text):
            with open(text) as f:
                raw = json.load(f)
            if "model_type" not in raw:
                raise PluginError(f"{text} has no model_type, so its architecture is unknown; add \"model_type\": \"llama\""
                                  " (or the right type) to it")
            raw.update(config_overrides)
            model_type = raw.pop("model_type")
            raw.pop("architectures", None)
            raw.pop("transformers_version", None)
            cfg = AutoConfig.for_model(model_type, **raw)
            cfg.name_or_path = os.path.basename(os.path.dirname(os.path.abspath(text))) or text
        else:
            cfg = AutoConfig.from_pretrained(text, **config_overrides)
    except PluginError:
        raise
    except Exception as e:  # OSError offline, ValueError for an unknown model type, ...
        raise PluginError(
            f"cannot read a model configuration from {text!r} ({type(e).__name__}: {e}). Give a config.json, a model "
            f"folder with one, a hub id that is in the local cache, or a preset: {', '.join(preset_names())}"
        ) from e
    return shape_from_config(cfg)


def shape_from_config(config: Any) -> ModelShape:
    """Instantiate the model on the meta device (no memory, no weights) and count its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise PluginError(
            f"cannot build {getattr(config, 'model_type', '?')!r} on the meta device to count its parameters "
            f"({type(e).__name__}: {e}); is it a causal LM that transformers knows?"
        ) from e
    return shape_from_model(model, name=getattr(config, "name_or_path", "") or getattr(config, "model_type", "model"))


def shape_from_model(model: Any, name: str | None = None) -> ModelShape:
    """Count the parameters of a model object (on any device, including meta)."""
    cfg = model.config
    layers = anatomy.layer_list(model)
    if layers is None:
        raise PluginError(f"{type(model).__name__}: cannot find its decoder layers (a ModuleList at "
                          f"{', '.join(anatomy.LAYER_PATHS)}); the planner needs a decoder-only causal LM")
    embed, head = anatomy.embeddings(model), anatomy.lm_head(model)
    seen: set[int] = set()

    def count(params) -> int:
        n = 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embed_n = count(embed.parameters()) if embed is not None else 0
    layer_n = tuple(count(layer.parameters()) for layer in layers)
    head_n = count(head.parameters()) if head is not None else 0
    other_n = count(model.parameters())
    tied = head is not None and embed is not None and head_n == 0 and head.weight is embed.weight
    mats = tuple((n, (int(p.shape[0]), int(p.shape[1]))) for n, p in layers[0].named_parameters() if p.dim() == 2)
    names = {n.rsplit(".", 2)[-2] if n.count(".") else n for n, _ in mats}
    llama_like = {"q_proj", "k_proj", "v_proj", "o_proj"} <= names
    gated = {"gate_proj", "up_proj", "down_proj"} <= names or "gate_up_proj" in names
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or (embed.embedding_dim if embed else 0))
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 1)
    n_kv = int(getattr(cfg, "num_key_value_heads", 0) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or hidden // n_heads)
    inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
    vocab = int(getattr(cfg, "vocab_size", 0) or (embed.num_embeddings if embed is not None else 0))
    total = embed_n + sum(layer_n) + head_n + other_n
    return ModelShape(
        name=name or getattr(cfg, "name_or_path", "") or getattr(cfg, "model_type", "model"),
        model_type=str(getattr(cfg, "model_type", "?")), n_layers=len(layers), hidden=hidden, intermediate=inter,
        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab=vocab, tied=tied, params_total=total,
        layer_params=layer_n, layer_matrices=mats, embed_params=embed_n, head_params=head_n, other_params=other_n,
        llama_like=llama_like, gated_mlp=gated, max_positions=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )
