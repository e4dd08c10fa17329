"""Errors, results and small helpers shared by the export modules."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_lowmem.errors import LowMemError

#: the formats :func:`hf_lowmem.export.export_model` writes
FORMATS = ("hf", "onnx", "torchscript", "exported-program")

#: the file each graph format writes into the output folder
ARTIFACT = {"onnx": "model.onnx", "torchscript": "model.pt", "exported-program": "model.pt2"}

#: the report written beside the exported files
REPORT_NAME = "hf_lowmem_export.json"

#: sample inputs of validation, (batch, sequence); the example the graph exporters trace is (2, 11)
SAMPLE_SHAPES = ((1, 7), (3, 19))
EXAMPLE_SHAPE = (2, 11)

#: default tolerance on the largest logit difference, relative to the largest |logit| of the reference
#: (the bound used is ``rtol * max(1, max|reference logits|)``)
RTOL = {"float32": 1e-4, "float64": 1e-8, "float16": 5e-3, "bfloat16": 1.5e-2}

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ExportError(LowMemError, RuntimeError):
    """An export that cannot be done or did not validate. Nothing is left at the output path."""


@dataclass
class ShapeCheck:
    """The largest logit difference on one sample input (positions the attention mask keeps)."""

    batch: int
    seq: int
    max_abs_diff: float
    max_abs_logit: float


@dataclass
class ExportResult:
    """What :func:`~hf_lowmem.export.export_model` did. ``max_abs_diff`` is the largest logit difference
    between the exported artifact and the PyTorch reference over every sample input (``None`` when
    validation was skipped)."""

    format: str
    output: str
    artifact: str
    files: list[str]
    size_bytes: int
    load_seconds: float
    export_seconds: float
    validate_seconds: float
    dtype: str
    exporter: str
    reference: str
    checks: list[ShapeCheck] = field(default_factory=list)
    max_abs_diff: float | None = None
    tolerance: float | None = None
    dropped_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        size = f"{self.size_bytes / 1e6:.1f} MB"
        lines = [f"exported {self.format} ({self.dtype}) -> {Path(self.output) / self.artifact} ({size}) "
                 f"in {self.export_seconds:.1f} s (+{self.load_seconds:.1f} s loading) with {self.exporter}"]
        if self.max_abs_diff is None:
            lines.append("validation skipped")
        else:
            shapes = "; ".join(f"{c.batch}x{c.seq}: {c.max_abs_diff:.3g}" for c in self.checks)
            lines.append(f"largest logit difference vs {self.reference}: {self.max_abs_diff:.3g} "
                         f"(per input batch x seq: {shapes}; tolerance {self.tolerance:.3g}) OK")
        if self.dropped_keys:
            lines.append(f"dropped {len(self.dropped_keys)} plugin-only key(s): {', '.join(self.dropped_keys[:8])}"
                         + (" ..." if len(self.dropped_keys) > 8 else ""))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


class GuardedFile:
    """A binary file for torch's zip writers (``torch.jit.save``, ``torch.export.save``). Given a path, those
    abort the process (SIGABRT) when the disk fills: the writer's C++ destructor writes the end of the zip,
    fails again and throws. Given this object, the first failed write raises ``OSError`` and later writes
    are dropped, so the destructor finishes quietly."""

    def __init__(self, f: Any):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        if self.error is not None:
            return len(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        if self.error is None:
            self._f.flush()


def short_error(exc: BaseException, limit: int = 600) -> str:
    """The first meaningful lines of an exception, without terminal colours."""
    text = _ANSI.sub("", f"{type(exc).__name__}: {exc}").strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    out = " ".join(lines[:3])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")
