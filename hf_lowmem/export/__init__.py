"""Export a trained model for inference: a standard transformers checkpoint, ONNX, TorchScript, or a
``torch.export`` program.

Python::

    from hf_lowmem.export import export_model

    result = export_model("out/run1", "deploy/onnx", format="onnx")      # a model folder
    result = export_model(trainer, "deploy/hf", format="hf")              # a LowMemTrainer (or any Trainer)
    result = export_model(model, "deploy/pt2", format="exported-program") # a live model object
    print(result.summary(), result.max_abs_diff)

Command line: ``hf-lowmem export MODEL_DIR --format {hf,onnx,torchscript,exported-program} --output OUT``.

Every format starts from the *materialized* model (:func:`materialize`): a plain transformers causal LM
of the original class on the CPU, in the original precision, whatever plugins changed during training
(quantized weights dequantized, offloaded tensors gathered, plugin-only keys dropped). Plugins take part
through two documented paths, either is enough:

- the ``hf_lowmem_before_save(ctx, model, state_dict)`` hook, which ``LowMemTrainer.save_model`` runs and
  ``export_model`` runs too when it knows the run context (a trainer, or ``ctx=``);
- the module protocol: a module whose weights are stored differently defines
  ``hf_lowmem_dequantized_state(self) -> dict[str, Tensor]`` giving its standard state (names relative to
  the module, e.g. ``{"weight": w}`` for a replaced ``nn.Linear``) in the original precision. That works
  on a bare model object, with no run context. It is for third-party modules: hf-lowmem's own plugins
  (``int8-weights``, ``bnb-nf4``, ``bnb-int8``) do not implement it, so their models export through the
  save hook: from the trainer, its saved folder, or with ``ctx=``.

Formats (``OUT`` is a folder; each also gets the config, generation config, tokenizer files and
``hf_lowmem_export.json``, the report below):

``hf``
    ``save_pretrained`` safetensors, in the original precision (``dtype=`` to change it). Validated by
    loading it with ``AutoModelForCausalLM.from_pretrained(OUT)`` and comparing logits with the source
    (the live model itself when it was given one).
``onnx``
    ``model.onnx`` (+ ``model.onnx.data`` above ~1.8 GB of weights) with the KV cache, as optimum's
    text-generation-with-past: inputs ``input_ids``, ``attention_mask``, ``position_ids`` and
    ``past_key_values.N.key/value``, outputs ``logits`` and ``present.N.key/value`` (dynamic batch and
    lengths; :mod:`hf_lowmem.export.kv_cache`); a model without a standard cache gets ``input_ids``,
    ``attention_mask`` -> ``logits``. The dynamo exporter is tried first, then the TorchScript-based one.
    Float32 by default, since onnxruntime's CPU kernels lack bfloat16. Validated with onnxruntime, and
    by generating 20 tokens greedily as PyTorch does.
``torchscript``
    ``model.pt``, ``torch.jit.trace`` of ``forward(input_ids, attention_mask) -> logits``; load with
    ``torch.jit.load``.
``exported-program``
    ``model.pt2``, ``torch.export`` with dynamic batch and sequence, saved with ``torch.export.save``; load
    with ``torch.export.load(path).module()``.

Validation runs the artifact as loaded back from disk against the PyTorch model on inputs of two shapes
(``SAMPLE_SHAPES``, one of them left-padded) and fails unless the largest logit difference, over the
positions the attention mask keeps, is within ``tolerance`` (default: a dtype-dependent fraction of the
largest logit). Any failure raises :class:`ExportError` and leaves nothing at ``OUT``: everything is
written to a temporary folder beside it and moved into place only at the end; a full disk is one line
naming the free space, and temporary folders that a killed export left are removed by the next export
to the same ``OUT``. ``overwrite=True`` replaces only an earlier export (a folder whose report lists
every file in it): a folder holding anything else, such as a training run's checkpoints, is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from hf_lowmem.export._common import (
    ARTIFACT,
    FORMATS,
    REPORT_NAME,
    RTOL,
    SAMPLE_SHAPES,
    ExportError,
    ExportResult,
    ShapeCheck,
    dtype_name,
    short_error,
)
from hf_lowmem.export.source import (
    DEQUANTIZED_STATE_METHOD,
    Materialized,
    copy_side_files,
    gather_state_dict,
    materialize,
)

__all__ = ["export_model", "materialize", "gather_state_dict", "ExportError", "ExportResult", "ShapeCheck",
           "Materialized", "FORMATS", "ARTIFACT", "SAMPLE_SHAPES", "DEQUANTIZED_STATE_METHOD", "logits_only"]

logger = logging.getLogger("hf_lowmem")

#: default export precision of each format: ``None`` keeps the original precision
DEFAULT_DTYPE = {"hf": None, "onnx": "float32", "torchscript": None, "exported-program": None}


def logits_only(model):
    """``model`` as ``forward(input_ids, attention_mask) -> logits``, the signature graph formats use."""
    from hf_lowmem.export.formats import logits_only as _lo

    return _lo(model)


def _reference_runner(module):
    """Run ``module`` (a causal LM, possibly on a GPU) in eval mode, restoring its mode afterwards."""
    import torch

    def run(ids, mask):
        device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                out = module(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        finally:
            module.train(was_training)
        return out.logits if hasattr(out, "logits") else out[0]

    return run


def _compare(ref_run, run, config, shapes, tolerance, dtype) -> tuple[list[ShapeCheck], float, float]:
    """Run both on each sample shape; raise :class:`ExportError` when a difference exceeds the tolerance."""
    import torch

    from hf_lowmem.export.formats import example_inputs

    checks: list[ShapeCheck] = []
    bound = None
    for shape in shapes:
        ids, mask = example_inputs(config, shape)
        ref = ref_run(ids, mask).detach().float().cpu()
        try:
            out = run(ids, mask)
        except Exception as e:
            raise ExportError(f"the exported model fails on an input of shape {tuple(shape)}: {short_error(e)}") from e
        out = torch.as_tensor(out).detach().float().cpu()
        if tuple(out.shape) != tuple(ref.shape):
            raise ExportError(f"the exported model returns logits of shape {tuple(out.shape)} for an input of shape "
                              f"{tuple(shape)}, expected {tuple(ref.shape)} (a shape was fixed at export time)")
        keep = mask.bool()
        diff = (out[keep] - ref[keep]).abs()
        if not torch.isfinite(out[keep]).all():
            raise ExportError(f"the exported model returns non-finite logits for an input of shape {tuple(shape)}")
        scale = float(ref[keep].abs().max())
        checks.append(ShapeCheck(batch=shape[0], seq=shape[1], max_abs_diff=float(diff.max()), max_abs_logit=scale))
        this_bound = tolerance if tolerance is not None else RTOL.get(dtype, 3e-2) * max(1.0, scale)
        bound = this_bound if bound is None else min(bound, this_bound)
    worst = max(c.max_abs_diff for c in checks)
    if worst > bound:
        detail = "; ".join(f"{c.batch}x{c.seq}: {c.max_abs_diff:.3g}" for c in checks)
        raise ExportError(f"the exported model's logits differ from PyTorch's by up to {worst:.3g} (per input "
                          f"batch x seq: {detail}), above the tolerance {bound:.3g}. The export is not faithful "
                          "(e.g. a shape or a branch was frozen at export time); pass tolerance= only if this "
                          "difference is expected")
    return checks, worst, bound


def _check_output(out: Path, sources: list[Path], overwrite: bool) -> None:
    resolved = out.resolve()
    for src in sources:
        if resolved == src.resolve():
            raise ExportError(f"the output {str(out)!r} is the source folder; choose another --output")
        if resolved in src.resolve().parents:
            raise ExportError(f"the output {str(out)!r} contains the source folder {str(src)!r}, which replacing it "
                              "would delete; choose another --output")
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"the output {str(out)!r} is a file; pass a folder path for --output")
        if any(out.iterdir()) and not overwrite:
            raise ExportError(f"the output folder {str(out)!r} exists and is not empty; choose another --output, "
                              "or pass --overwrite (overwrite=True) to replace it")
        foreign = _not_an_export(out)
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise ExportError(f"the output folder {str(out)!r} holds files that no export wrote ({shown}); --overwrite "
                              f"replaces only an earlier export, so choose another --output (e.g. {str(out / 'export')!r})")


def _not_an_export(out: Path) -> list[str]:
    """The entries of ``out`` that an earlier export did not write (all of them when it has no report)."""
    entries = sorted(p.name for p in out.iterdir())
    try:
        written = set(json.loads((out / REPORT_NAME).read_text()).get("files") or [])
    except (OSError, ValueError, AttributeError):
        written = set()
    return [name for name in entries if name not in written]


def _write_failure(exc: BaseException, out: Path, fmt: str) -> ExportError | None:
    """A one-line :class:`ExportError` for a failed write (full disk, file-size limit, I/O error)."""
    from hf_lowmem.checkpoint import describe_write_error

    text = describe_write_error(exc, out.parent)
    if not (isinstance(exc, OSError) or "disk holding" in text or "file-size limit" in text):
        return None
    return ExportError(f"writing the {fmt} export to {str(out)!r} failed: {text}. Nothing was left at {str(out)!r}")


def _place(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an existing ``out`` is replaced only now."""
    backup = None
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, backup)
    os.replace(tmp, out)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _versions(fmt: str) -> dict[str, str]:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    if fmt == "onnx":
        for pkg in ("onnx", "onnxruntime", "onnxscript"):
            try:
                v[pkg] = __import__(pkg).__version__
            except Exception:  # pragma: no cover
                pass
    return v


def export_model(
    source: Any,
    output: str | os.PathLike,
    format: str = "hf",
    *,
    dtype: Any = None,
    ctx: Any = None,
    overwrite: bool = False,
    validate: bool = True,
    tolerance: float | None = None,
    onnx_exporter: str = "auto",
    opset: int | None = None,
    attn_implementation: str | None = None,
    sample_shapes: tuple[tuple[int, int], ...] = SAMPLE_SHAPES,
) -> ExportResult:
    """Export ``source`` (a model folder, a live causal LM, or a trainer) to ``output`` (a folder) in ``format``.

    :param dtype: precision of the export (``float32``, ``float16``, ``bfloat16``); default: the original
        precision, except ONNX (float32).
    :param ctx: a :class:`~hf_lowmem.context.LowMemContext` whose plugins' ``hf_lowmem_before_save`` should
        run on a live model's state (a trainer brings its own).
    :param overwrite: replace a non-empty ``output`` (only once the new export has validated).
    :param validate: compare logits with PyTorch (on by default; off leaves ``max_abs_diff`` unset).
    :param tolerance: largest allowed absolute logit difference; default ``RTOL[dtype] * max(1, max|logit|)``.
    :param onnx_exporter: ``auto`` (dynamo, then the TorchScript-based exporter), ``dynamo`` or ``torchscript``.
    :param opset: ONNX opset (the exporter's default when ``None``).
    :param attn_implementation: attention used for export (default ``sdpa`` where the model supports it).
    :return: an :class:`ExportResult`, also written to ``output/hf_lowmem_export.json``.
    :raises ExportError: the source cannot be exported or the export does not validate; nothing is left at ``output``.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if len(sample_shapes) < 1 or any(len(s) != 2 or min(s) < 1 for s in sample_shapes):
        raise ExportError(f"sample_shapes must be (batch, sequence) pairs of positive ints, got {sample_shapes!r}")
    out = Path(output)
    source_dirs = [Path(source)] if isinstance(source, (str, os.PathLike)) else []
    _check_output(out, source_dirs, overwrite)
    if format == "onnx":
        from hf_lowmem.export.formats import require_onnx

        require_onnx()  # fail before any heavy work

    from hf_lowmem.export import formats as F
    from hf_lowmem.export.source import _parse_dtype, quiet_transformers

    wanted = _parse_dtype(dtype if dtype is not None else DEFAULT_DTYPE[format])
    t0 = time.perf_counter()
    m = materialize(source, ctx=ctx, dtype=wanted if format == "hf" else None, attn_implementation=attn_implementation)
    model = m.model
    if wanted is not None and model.dtype != wanted:
        model = model.to(wanted)
    dt = dtype_name(model.dtype)

    load_seconds = time.perf_counter() - t0

    out.parent.mkdir(parents=True, exist_ok=True)
    from hf_lowmem.signals import OWNER_FILE, remove_stale, write_owner

    remove_stale(out.parent, f".{out.name}.partial-")  # left by an export that was killed
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_owner(tmp, "hf-lowmem export in progress")
        state: dict[str, Any] = {"checks": [], "worst": None, "bound": None, "seconds": 0.0}
        reference_name = "PyTorch (the materialized model, same precision)"
        ref_run, cmp_dtype = _reference_runner(model), dt

        def check(run):  # validate an artifact as loaded back from disk
            tv = time.perf_counter()
            try:
                state["checks"], state["worst"], state["bound"] = _compare(
                    ref_run, run, model.config, sample_shapes, tolerance, cmp_dtype)
            finally:
                state["seconds"] += time.perf_counter() - tv

        t1 = time.perf_counter()
        if format == "hf":
            written = F.write_hf(model, tmp)
            if validate:
                ref_run, reference_name = _reference_runner(m.reference), m.reference_name
                try:
                    ref_run(*F.example_inputs(model.config, (1, 2)))
                except Exception as e:  # a live model that cannot run on its own (e.g. needs its engine)
                    m.notes.append(f"the source model could not run a forward pass ({short_error(e, 200)}); "
                                   "compared with the materialized model instead")
                    ref_run, reference_name = _reference_runner(model), "the materialized model"
                ref_dtype = dtype_name(next(m.reference.parameters()).dtype)
                cmp_dtype = max({dt, ref_dtype}, key=lambda d: RTOL.get(d, 3e-2))
                check(written.run)
        elif format == "onnx":
            written = F.write_onnx(model, tmp, exporter=onnx_exporter, opset=opset, check=check if validate else None)
        else:
            writer = F.write_torchscript if format == "torchscript" else F.write_exported_program
            written = writer(model, tmp)
            if validate:
                check(written.run)
        export_seconds = time.perf_counter() - t1 - state["seconds"]
        if format != "hf":
            with quiet_transformers():
                model.config.save_pretrained(tmp)
                if getattr(model, "generation_config", None) is not None:
                    model.generation_config.save_pretrained(tmp)
        copy_side_files(m, tmp)
        (tmp / OWNER_FILE).unlink()
        artifact_files = [p for p in tmp.iterdir() if p.is_file() and (
            p.suffix == ".safetensors" or p.name.startswith(("model.onnx", "model.pt")))]
        result = ExportResult(
            format=format, output=str(out), artifact=written.artifact,
            files=sorted(p.name for p in tmp.iterdir() if p.is_file()) + [REPORT_NAME],
            size_bytes=sum(p.stat().st_size for p in artifact_files), load_seconds=round(load_seconds, 3),
            export_seconds=round(export_seconds, 3), validate_seconds=round(state["seconds"], 3), dtype=dt,
            exporter=written.exporter, reference=reference_name, checks=state["checks"], max_abs_diff=state["worst"],
            tolerance=state["bound"],
            dropped_keys=list(m.dropped_keys), notes=list(m.notes) + list(written.notes), versions=_versions(format),
        )
        (tmp / REPORT_NAME).write_text(json.dumps({"source": m.source, **result.to_dict()}, indent=2) + "\n")
        _place(tmp, out)
    except BaseException as e:
        failure = _write_failure(e, out, format) if isinstance(e, Exception) and not isinstance(e, ExportError) else None
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from e
        raise
    logger.info("hf-lowmem export: %s", result.summary())
    return result

