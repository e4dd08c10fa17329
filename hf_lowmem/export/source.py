"""Turn what the user has (a model folder, a live model with plugin-changed modules, a trainer) into a
plain transformers causal LM on the CPU, in the original precision: the *materialized* model every
export format starts from.

How a plugin gets its weights back into standard form (see also :mod:`hf_lowmem.export`):

1. ``hf_lowmem_before_save(ctx, model, state_dict)`` (the save hook of :mod:`hf_lowmem.spec`) runs on
   the state dict whenever a run context is known: always for ``LowMemTrainer.save_model`` and for a
   trainer passed to :func:`materialize`, and for a live model when ``ctx=`` is given.
2. A module that changes how its weights are stored (quantized, packed, offloaded) may also expose
   ``hf_lowmem_dequantized_state() -> dict[str, Tensor]``: its state under the standard names, relative
   to the module (``{"weight": ..., "bias": ...}`` for a replaced ``nn.Linear``), in the original
   precision, on any device. It replaces every state-dict key under that module, so plugin-only buffers
   disappear with it. This works with no run context at all (a bare model object).
3. Whatever the model's class does not have (plugin-only keys) is dropped and listed; a standard key
   that is missing, has the wrong shape, or has no data (``meta``) is an error naming the key.

Over 400 lines because it is one path with three entry points (a folder, a live model, a trainer) that share
the plugin-state handling above; split, each part would need the others' rules.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hf_lowmem.export._common import ExportError, short_error

logger = logging.getLogger("hf_lowmem")

#: the method a module implements to hand back its standard, original-precision state
DEQUANTIZED_STATE_METHOD = "hf_lowmem_dequantized_state"

#: name fragments that wrappers (torch.compile, activation checkpointing, FSDP) add to state-dict keys
_WRAPPER_INFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")

#: config attributes that only make sense inside a training run
_RUN_ONLY_CONFIG_ATTRS = ("quantization_config", "_pre_quantization_dtype")

#: files copied from a model folder next to any export (tokenizer and chat template)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class Materialized:
    """A clean causal LM plus what the exporters need to know about where it came from."""

    model: Any  #: plain ``PreTrainedModel`` of the original class, on the CPU, in eval mode
    source: str  #: a short description of the source
    reference: Any = None  #: the module the ``hf`` export is compared with (the live model, or ``model``)
    reference_name: str = "the source model"
    source_dir: Path | None = None
    tokenizer: Any = None  #: an object with ``save_pretrained`` (a trainer's processing class)
    dropped_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading report and progress bars (we report missing/unexpected keys ourselves)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def _is_trainer(obj: Any) -> bool:
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return False
    return isinstance(obj, Trainer)


def unwrap_model(model):
    """The model inside DDP / DataParallel / FSDP / DeepSpeed / ``torch.compile`` wrappers."""
    from hf_lowmem.anatomy import unwrap

    return unwrap(model)


def _strip_wrappers(key: str) -> str:
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, "")
    return key


def _to_local(t):
    """A DTensor's full value, anything else as it is (detached)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without distributed
        DTensor = ()  # type: ignore[assignment]
    if DTensor and isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach()


def gather_state_dict(model, *, ctx=None, hook_model=None) -> dict:
    """The full state dict of a (possibly plugin-changed) live model, with standard key names.

    In order: ``model.state_dict()`` (through accelerate's offload hooks when weights sit in an offload
    map), then the plugins' ``hf_lowmem_before_save`` hook when ``ctx`` is given, then every module's
    ``hf_lowmem_dequantized_state()`` (outermost module wins), DTensors gathered, wrapper name fragments
    removed. Values may still hold plugin-only keys; :func:`materialize` drops those.
    """
    import torch

    base = unwrap_model(model)
    state = dict(base.state_dict())
    if getattr(base, "hf_device_map", None) and any(v.device.type == "meta" for v in state.values()):
        from accelerate.utils import get_state_dict_offloaded_model

        state = dict(get_state_dict_offloaded_model(base))
    if ctx is not None:
        ctx.host.before_save(ctx=ctx, model=hook_model if hook_model is not None else model, state_dict=state)
    handled: list[str] = []
    for name, module in base.named_modules():
        fn = getattr(module, DEQUANTIZED_STATE_METHOD, None)
        if not callable(fn):
            continue
        prefix = _strip_wrappers(f"{name}.") if name else ""
        if any(prefix.startswith(h) for h in handled):
            continue  # an enclosing module already answered for this one
        handled.append(prefix)
        sub = fn()
        if not isinstance(sub, dict):
            raise ExportError(f"{type(module).__name__}.{DEQUANTIZED_STATE_METHOD}() at {name or '<root>'!r} returned "
                              f"{type(sub).__name__}; it must return a dict of tensor name -> tensor")
        for key in [k for k in state if _strip_wrappers(k).startswith(prefix)]:
            del state[key]
        for key, value in sub.items():
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"{DEQUANTIZED_STATE_METHOD}() of {name!r} gave {key!r} as {type(value).__name__}, not a tensor")
            state[prefix + key] = value
    return {_strip_wrappers(k): _to_local(v) for k, v in state.items()}


def clean_config(config, dtype=None):
    """A copy of ``config`` without run-only settings (quantization config, attributes plugins added)."""
    cfg = copy.deepcopy(config)
    for attr in _RUN_ONLY_CONFIG_ATTRS + tuple(k for k in vars(cfg) if k.startswith(("hf_lowmem", "lowmem_"))):
        if attr in vars(cfg):
            delattr(cfg, attr)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = True  # gradient checkpointing turns it off for training; inference wants it
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def _majority_dtype(state: dict):
    import torch

    counts: dict = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _parse_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise ExportError(f"unknown dtype {dtype!r}: use float32, float16 or bfloat16 (or leave it unset for the original precision)")
    return getattr(torch, name)


def _attn_for(cls, wanted: str | None) -> str:
    if wanted:
        return wanted
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def model_from_state(cls, config, state: dict, *, dtype=None, attn_implementation: str | None = None):
    """Build a plain ``cls`` from ``config`` and ``state``: plugin-only keys dropped (returned), every
    standard key checked for presence, shape and data. Returns ``(model, dropped_keys)``."""
    import torch

    target = _parse_dtype(dtype) or _majority_dtype(state)
    cfg = clean_config(config, target)
    with torch.device("meta"), quiet_transformers():
        skeleton = cls(copy.deepcopy(cfg))
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = _tied_groups(skeleton)
    del skeleton
    dropped = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state and not any(t in state for t in tied.get(k, ())))
    if missing:
        raise ExportError(_missing_message(cls, missing, dropped))
    kept = {}
    for key, value in state.items():
        if key in dropped:
            continue
        if tuple(value.shape) != expected[key]:
            raise ExportError(
                f"{key!r} has shape {tuple(value.shape)} but {cls.__name__} expects {expected[key]}: a plugin changed "
                f"how it is stored (quantized or packed?) and did not restore it. The plugin must restore it in "
                f"hf_lowmem_before_save, or the module holding it must implement {DEQUANTIZED_STATE_METHOD}()")
        if value.device.type == "meta":
            raise ExportError(
                f"{key!r} has no data (it is on the meta device, e.g. offloaded by a plugin): the plugin must gather it in "
                f"hf_lowmem_before_save, or its module must implement {DEQUANTIZED_STATE_METHOD}()")
        if value.numel() > 1 and value.dim() > 0 and all(s == 0 for s in value.stride()):
            raise ExportError(
                f"{key!r} is a placeholder with no storage of its own (every stride is 0): a plugin keeps this weight "
                f"elsewhere (e.g. in int8) and did not restore it. Export the trainer (its plugins' "
                f"hf_lowmem_before_save then runs), pass ctx=trainer.lowmem_ctx, or give the module a "
                f"{DEQUANTIZED_STATE_METHOD}() method")
        value = value.to("cpu")
        if value.is_floating_point() and value.dtype != target:
            value = value.to(target)
        kept[key] = value.contiguous()
    attn = _attn_for(cls, attn_implementation)
    with quiet_transformers():
        try:
            model, info = cls.from_pretrained(None, config=cfg, state_dict=kept, dtype=target,
                                              attn_implementation=attn, output_loading_info=True)
        except (TypeError, ValueError, OSError) as e:  # a transformers without state_dict loading
            logger.info("hf-lowmem export: from_pretrained(None, state_dict=...) failed (%s); building the model directly",
                        short_error(e))
            model = _build_and_load(cls, cfg, kept, target, attn)
            info = {"missing_keys": [], "mismatched_keys": []}
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ExportError(_missing_message(cls, missing, dropped))
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if mismatched:
        raise ExportError(f"weights with unexpected shapes: {', '.join(mismatched[:6])}")
    return model.eval(), dropped


def _tied_groups(skeleton) -> dict[str, tuple[str, ...]]:
    """For each parameter name, the other names of the same (tied) parameter."""
    by_id: dict[int, list[str]] = {}
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {n: tuple(o for o in names if o != n) for names in by_id.values() if len(names) > 1 for n in names}


def _missing_message(cls, missing: list[str], dropped: list[str]) -> str:
    shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
    modules = {k.rsplit(".", 1)[0] for k in missing}
    instead = sorted(k for k in dropped if k.rsplit(".", 1)[0] in modules)
    held = f" (their modules hold {', '.join(sorted({k.rsplit('.', 1)[1] for k in instead}))} instead)" if instead else ""
    return (f"{len(missing)} weight(s) of {cls.__name__} are not in the model's state: {shown}{held}. A plugin "
            f"replaced the modules holding them. Export the trainer, or pass ctx=trainer.lowmem_ctx, so the plugins' "
            f"hf_lowmem_before_save restores them; a plugin module can also implement {DEQUANTIZED_STATE_METHOD}()")


def _build_and_load(cls, cfg, state, dtype, attn):
    import torch

    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = attn
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    missing = [k for k in result.missing_keys if not _is_tied(model, k)]
    if missing:
        raise ExportError(f"weights missing from the model's state: {', '.join(missing[:6])}")
    return model


def _is_tied(model, key: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    p = params.get(key)
    return p is not None and sum(1 for q in params.values() if q is p) > 1


def _check_causal(config, where: str):
    cls = _causal_lm_class(config)
    if cls is None:
        raise ExportError(
            f"{where} is a {type(config).__name__} (model_type {getattr(config, 'model_type', '?')!r}), which "
            "AutoModelForCausalLM cannot load: export handles causal language models (Llama, Mistral, Qwen2, ...)")
    return cls


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise ExportError(f"no model folder at {str(path)!r}: pass the folder written by save_pretrained or "
                          "LowMemTrainer.save_model (it holds config.json and model.safetensors)")
    if not path.is_dir():
        raise ExportError(f"{str(path)!r} is a file; pass the model folder that holds config.json and the weights")
    if not (path / "config.json").is_file():
        raise ExportError(f"{str(path)!r} has no config.json: it is not a transformers model folder "
                          "(pass the folder written by save_pretrained or LowMemTrainer.save_model)")
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("*.safetensors"))
    if not has_weights:
        raise ExportError(f"{str(path)!r} has config.json but no weights (model.safetensors or pytorch_model.bin)")


def _from_folder(path: Path, dtype=None, attn_implementation: str | None = None) -> Materialized:
    from transformers import AutoConfig

    _check_folder(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ExportError(f"cannot read {str(path / 'config.json')!r}: {short_error(e)}") from e
    cls = _check_causal(config, f"the model in {str(path)!r}")
    qc = getattr(config, "quantization_config", None)
    if qc:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", qc)
        raise ExportError(
            f"{str(path)!r} holds a checkpoint quantized by transformers (quant_method {method!r}), not the original "
            "precision. Load it, call model.dequantize(), and export the model object; or export the folder "
            "LowMemTrainer.save_model wrote, which is already in the original precision")
    target = _parse_dtype(dtype)
    with quiet_transformers():
        try:
            model, info = cls.from_pretrained(path, dtype=target or "auto", output_loading_info=True,
                                              attn_implementation=_attn_for(cls, attn_implementation))
        except Exception as e:
            raise ExportError(f"cannot load the model in {str(path)!r}: {short_error(e)}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ExportError(f"the checkpoint in {str(path)!r} lacks {len(missing)} weight(s) of {cls.__name__}: "
                          f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if mismatched:
        raise ExportError(f"the checkpoint in {str(path)!r} has weights of the wrong shape: {', '.join(mismatched[:6])}")
    model.eval()
    return Materialized(model=model, source=str(path), reference=model, reference_name=f"the model in {path.name}",
                        source_dir=path, dropped_keys=sorted(info.get("unexpected_keys") or []))


def _from_live(model, *, ctx=None, hook_model=None, dtype=None, attn_implementation=None, source: str | None = None,
               tokenizer=None) -> Materialized:
    import torch
    from transformers import PreTrainedModel

    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise ExportError(f"cannot export a {type(base).__name__}: pass a transformers causal LM (a PreTrainedModel "
                          "such as LlamaForCausalLM), a trainer, or the folder save_pretrained wrote")
    if base.get_output_embeddings() is None:
        raise ExportError(f"{type(base).__name__} has no language-model head (it returns hidden states, not logits): "
                          "export the ...ForCausalLM model")
    cls = type(base)
    with torch.no_grad():
        state = gather_state_dict(model, ctx=ctx, hook_model=hook_model)
    clean, dropped = model_from_state(cls, base.config, state, dtype=dtype, attn_implementation=attn_implementation)
    gen = getattr(base, "generation_config", None)
    if gen is not None:
        clean.generation_config = copy.deepcopy(gen)
    name = source or f"live {cls.__name__}"
    return Materialized(model=clean, source=name, reference=model, reference_name=f"the live model ({cls.__name__})",
                        tokenizer=tokenizer, dropped_keys=dropped)


def materialize(source, *, ctx=None, dtype=None, attn_implementation: str | None = None) -> Materialized:
    """A plain transformers causal LM on the CPU in the original precision (or ``dtype``), from

    - a model folder (``save_pretrained`` / ``LowMemTrainer.save_model`` output),
    - a live model, possibly with plugin-changed modules (pass ``ctx`` to run the plugins' save hook), or
    - a trainer (``LowMemTrainer``: its engine is flushed and its plugins' save hook runs).

    Raises :class:`ExportError` with what to fix when the source cannot become a standard checkpoint.
    """
    if isinstance(source, (str, os.PathLike)):
        return _from_folder(Path(source), dtype=dtype, attn_implementation=attn_implementation)
    if _is_trainer(source):
        trainer = source
        engine = getattr(trainer, "lowmem_engine", None)
        if engine is not None:
            engine.flush()
        trainer_ctx = ctx if ctx is not None else getattr(trainer, "lowmem_ctx", None)
        model = trainer.accelerator.unwrap_model(trainer.model) if getattr(trainer, "accelerator", None) else trainer.model
        return _from_live(model, ctx=trainer_ctx, hook_model=trainer.model, dtype=dtype,
                          attn_implementation=attn_implementation, source=f"{type(trainer).__name__}.model",
                          tokenizer=getattr(trainer, "processing_class", None))
    import torch

    if isinstance(source, torch.nn.Module):
        return _from_live(source, ctx=ctx, dtype=dtype, attn_implementation=attn_implementation)
    raise ExportError(f"cannot export a {type(source).__name__}: pass a model folder path, a transformers causal LM, "
                      "or a trainer")


def copy_side_files(m: Materialized, out: Path) -> list[str]:
    """Tokenizer files (and chat template) next to the export: copied from the source folder, or written
    by the trainer's processing class."""
    written: list[str] = []
    if m.source_dir is not None:
        for name in TOKENIZER_FILES:
            src = m.source_dir / name
            if src.is_file() and not (out / name).exists():
                shutil.copy2(src, out / name)
                written.append(name)
    elif m.tokenizer is not None and hasattr(m.tokenizer, "save_pretrained"):
        before = set(os.listdir(out))
        try:
            m.tokenizer.save_pretrained(out)
        except Exception as e:  # a tokenizer that cannot save does not spoil the model export
            m.notes.append(f"the tokenizer was not saved: {short_error(e)}")
        written.extend(sorted(set(os.listdir(out)) - before))
    return written
