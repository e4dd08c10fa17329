"""The four formats: how each is written, loaded back, and run on the sample inputs.

Each ``write_*`` function writes into a fresh folder and returns a :class:`Written`: the artifact name,
the exporter used, and a ``run(input_ids, attention_mask) -> logits`` that executes the artifact *as
loaded back from disk*, so that validation tests what a user will deploy. The ONNX graph carries the KV
cache (:mod:`hf_lowmem.export.kv_cache`); its ``run`` feeds an empty past.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hf_lowmem.export._common import ARTIFACT, EXAMPLE_SHAPE, ExportError, GuardedFile, short_error
from hf_lowmem.export.source import quiet_transformers

logger = logging.getLogger("hf_lowmem")

#: ONNX exporters tried by ``onnx_exporter="auto"``, in order
ONNX_EXPORTERS = ("dynamo", "torchscript")

#: models whose parameters take more bytes than this are exported to ONNX with external data (protobuf's 2 GB limit)
ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class Written:
    artifact: str
    exporter: str
    run: Callable[[Any, Any], Any]
    notes: list[str] = field(default_factory=list)
    fallback_errors: list[str] = field(default_factory=list)


def _torch():
    import torch

    return torch


def logits_only(model):
    """Wrap a causal LM as ``forward(input_ids, attention_mask) -> logits`` (no cache, no loss): the
    signature every graph format is exported with."""
    torch = _torch()

    class LogitsOnlyLM(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits

    return LogitsOnlyLM(model).eval()


def example_inputs(config, shape=EXAMPLE_SHAPE, seed: int = 1234):
    """Token ids and an attention mask of ``shape``; with batch > 1 the first row is left-padded, so the
    padding path of the mask is part of what is traced and checked."""
    torch = _torch()
    batch, seq = shape
    vocab = int(getattr(config, "vocab_size", None) or config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(seed + 7919 * batch + seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.long)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and seq > 3:
        mask[0, : max(1, seq // 4)] = 0
    return ids, mask


@contextlib.contextmanager
def _quiet():
    """Exporters print progress and warn a lot; keep that out of the user's output (logged at debug)."""
    buf = io.StringIO()
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), quiet_transformers():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(noisy, levels):
                lg.setLevel(level)
            if buf.getvalue().strip():
                logger.debug("exporter output:\n%s", buf.getvalue())


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _max_positions(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 1 else None


def _dims(config):
    torch = _torch()
    batch = torch.export.Dim("batch", min=1)
    seq_max = _max_positions(config)
    seq = torch.export.Dim("sequence", min=1, max=seq_max) if seq_max else torch.export.Dim("sequence", min=1)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def _no_grad_runner(module):
    torch = _torch()

    def run(ids, mask):
        with torch.no_grad():
            return module(ids, mask)

    return run


# ---- hf ---------------------------------------------------------------------------------------------------
def write_hf(model, folder: Path) -> Written:
    """``save_pretrained`` (safetensors), then load it back with ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model.save_pretrained(folder)
    if any(folder.glob("*.bin")) or not any(folder.glob("*.safetensors")):
        raise ExportError(f"save_pretrained did not write safetensors files into {folder}")
    with quiet_transformers():
        try:
            reloaded = AutoModelForCausalLM.from_pretrained(folder)
        except Exception as e:
            raise ExportError(f"AutoModelForCausalLM.from_pretrained cannot load the written checkpoint: {short_error(e)}") from e
    reloaded.eval()
    torch = _torch()

    def run(ids, mask):
        with torch.no_grad():
            return reloaded(input_ids=ids, attention_mask=mask, use_cache=False).logits

    artifact = "model.safetensors" if (folder / "model.safetensors").exists() else "model.safetensors.index.json"
    return Written(artifact=artifact, exporter=f"save_pretrained (safetensors), reloaded with AutoModelForCausalLM "
                   f"({str(reloaded.dtype).replace('torch.', '')})", run=run)


# ---- torchscript -----------------------------------------------------------------------------------------------
def write_torchscript(model, folder: Path) -> Written:
    torch = _torch()
    wrapper = logits_only(model)
    ids, mask = example_inputs(model.config)
    path = folder / ARTIFACT["torchscript"]
    try:
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(wrapper, (ids, mask), check_trace=False, strict=False)
    except Exception as e:
        raise ExportError(f"torch.jit.trace cannot trace {type(model).__name__}: {short_error(e)}") from e
    with open(path, "wb") as f:  # not the path: torch.jit.save to a path aborts the process when the disk fills
        torch.jit.save(traced, GuardedFile(f))
    loaded = torch.jit.load(str(path), map_location="cpu")
    loaded.eval()
    return Written(artifact=path.name, exporter=f"torch.jit.trace (torch {torch.__version__})", run=_no_grad_runner(loaded))


# ---- exported-program -------------------------------------------------------------------------------------------
def write_exported_program(model, folder: Path) -> Written:
    torch = _torch()
    wrapper = logits_only(model)
    ids, mask = example_inputs(model.config)
    path = folder / ARTIFACT["exported-program"]
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(wrapper, (ids, mask), dynamic_shapes=_dims(model.config), strict=False)
    except Exception as e:
        raise ExportError(f"torch.export cannot export {type(model).__name__} with dynamic batch and sequence: "
                          f"{short_error(e)}") from e
    with open(path, "wb") as f:  # as for torch.jit.save: a full disk raises instead of aborting
        torch.export.save(program, GuardedFile(f))
    loaded = torch.export.load(str(path)).module()
    return Written(artifact=path.name, exporter=f"torch.export (strict=False, torch {torch.__version__})",
                   run=_no_grad_runner(loaded))


# ---- onnx ----------------------------------------------------------------------------------------------------------
def require_onnx() -> None:
    """onnx, onnxruntime and onnxscript import, or a :class:`MissingExtraError` naming the extra."""
    from hf_lowmem.errors import MissingExtraError

    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(package)
        except Exception as e:
            raise MissingExtraError("export --format onnx", package, "onnx", e) from e


def _onnx_once(model, path: Path, exporter: str, opset: int | None, layout=None) -> None:
    """One export attempt: the graph with a KV cache when ``layout`` is given (see
    :mod:`hf_lowmem.export.kv_cache`), else ``forward(input_ids, attention_mask) -> logits``."""
    from hf_lowmem.export import kv_cache

    torch = _torch()
    external = _param_bytes(model) > ONNX_EXTERNAL_DATA_BYTES
    if layout is not None:
        wrapper = kv_cache.with_past(model, layout)
        args = kv_cache.example(model.config, layout, EXAMPLE_SHAPE, next(model.parameters()).dtype)
        names = (["input_ids", "attention_mask", "position_ids"] + layout.past_names(), ["logits"] + layout.present_names())
    else:
        wrapper = logits_only(model)
        args = example_inputs(model.config)
        names = (["input_ids", "attention_mask"], ["logits"])
    common = {"input_names": names[0], "output_names": names[1], "external_data": external}
    if opset is not None:
        common["opset_version"] = opset
    with _quiet(), torch.no_grad():
        if exporter == "dynamo":
            shapes = kv_cache.export_axes(layout, model.config, dynamo=True) if layout is not None else _dims(model.config)
            torch.onnx.export(wrapper, args, str(path), dynamo=True, dynamic_shapes=shapes,
                              verbose=False, artifacts_dir=str(path.parent), **common)
        else:
            axes = (kv_cache.export_axes(layout, model.config, dynamo=False) if layout is not None else
                    {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                     "logits": {0: "batch", 1: "sequence"}})
            common.setdefault("opset_version", 17)
            torch.onnx.export(wrapper, args, str(path), dynamo=False, dynamic_axes=axes, **common)


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_runner(path: Path, with_past: bool):
    """``run(input_ids, attention_mask) -> logits`` of the graph as loaded back (an empty past when it has
    a KV cache), and the :class:`~hf_lowmem.export.kv_cache.OrtDecoder` (or ``None``)."""
    import numpy as np

    from hf_lowmem.export.kv_cache import OrtDecoder

    torch = _torch()
    session = _ort_session(path)
    names = [i.name for i in session.get_inputs()]
    if with_past:
        if names[:3] != ["input_ids", "attention_mask", "position_ids"] or len(names) < 5:
            raise ExportError(f"the ONNX graph takes inputs {names[:5]}..., expected input_ids, attention_mask, "
                              "position_ids and past_key_values.*")
        decoder = OrtDecoder(session)
        return decoder.logits, decoder
    if names != ["input_ids", "attention_mask"]:
        raise ExportError(f"the ONNX graph takes inputs {names}, expected ['input_ids', 'attention_mask']")

    def run(ids, mask):
        out = session.run(["logits"], {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)})[0]
        return torch.from_numpy(np.asarray(out))

    return run, None


def write_onnx(model, folder: Path, *, exporter: str = "auto", opset: int | None = None,
               check: Callable[[Callable], None] | None = None) -> Written:
    """Export with the dynamo exporter, falling back to the TorchScript-based one (``exporter="auto"``).
    A model that returns a standard KV cache is exported with it (past_key_values inputs, present outputs;
    :mod:`hf_lowmem.export.kv_cache`), and validated by greedy generation too; should no exporter manage the
    cache, the graph is exported without it, with a note. ``check(run)`` validates an attempt's logits; an
    attempt that fails to export, load or validate is removed and the next one is tried. All failing:
    :class:`ExportError` with each attempt's reason."""
    from hf_lowmem.export._common import RTOL
    from hf_lowmem.export.kv_cache import cache_layout, check_generation

    torch = _torch()
    require_onnx()
    order = ONNX_EXPORTERS if exporter == "auto" else (exporter,)
    if any(e not in ONNX_EXPORTERS for e in order):
        raise ExportError(f"unknown ONNX exporter {exporter!r}: use auto, dynamo or torchscript")
    path = folder / ARTIFACT["onnx"]
    layout = cache_layout(model)
    attempts = [(name, layout) for name in order] + ([(name, None) for name in order] if layout is not None else [])
    errors: list[str] = []
    for name, lay in attempts:
        label = f"{name} exporter" + (", with KV cache" if lay is not None else ", without KV cache" if layout else "")
        for stale in folder.glob("model.onnx*"):
            stale.unlink()
        try:
            _onnx_once(model, path, name, opset, lay)
            if not path.is_file():
                raise ExportError("the exporter wrote no file")
            run, decoder = _ort_runner(path, with_past=lay is not None)
            notes = []
            if check is not None:
                check(run)
                if decoder is not None:
                    dt = str(next(model.parameters()).dtype).replace("torch.", "")
                    notes.append(check_generation(model, decoder, tolerance=RTOL.get(dt, 3e-2) * 10))
        except Exception as e:
            if isinstance(e, OSError):  # a full disk is no reason to try another exporter
                raise
            errors.append(f"{label}: {short_error(e)}")
            logger.info("hf-lowmem export: ONNX %s failed: %s", label, short_error(e))
            continue
        how = "torch.onnx.export dynamo=True" if name == "dynamo" else "torch.onnx.export dynamo=False (TorchScript-based)"
        written = Written(artifact=path.name, exporter=f"{how} (torch {torch.__version__}), onnxruntime CPU", run=run,
                          fallback_errors=errors, notes=notes)
        if lay is None and layout is not None:
            written.notes.append("exported WITHOUT a KV cache (generation recomputes the prefix): no exporter managed it")
        if errors:
            written.notes.append("fell back after: " + "; ".join(errors))
        if any(folder.glob("model.onnx.data")) or any(p.name != path.name for p in folder.glob("*.onnx*")):
            written.notes.append("weights are stored as ONNX external data beside model.onnx")
        return written
    for stale in folder.glob("*.onnx*"):
        stale.unlink()
    raise ExportError(
        f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}) cannot be exported to ONNX: "
        + "; ".join(errors)
        + ". The architecture uses something the ONNX exporters do not handle; export it with --format "
          "exported-program or --format hf instead")
