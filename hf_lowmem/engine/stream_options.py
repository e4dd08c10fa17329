"""Options of the ``stream`` plugin (no torch import, so registering the plugin stays cheap)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass
class StreamOptions:
    """Options of the ``stream`` plugin (``lowmem_options={"stream": {...}}``).

    :param states: optimizer states: ``fp32`` (exact AdamW, 8 B/param), ``8bit`` (bitsandbytes block-wise,
        ~2 B/param; needs the ``bnb`` extra), or ``auto``: ``8bit`` when ``lowmem_optimizer`` is
        ``bnb-adamw8bit``, else ``fp32``.
    :param loss_chunk_tokens: tokens per chunk of the LM head + cross-entropy (bounds the logits memory).
    :param check_memory: refuse to start when the estimated GPU or host memory exceeds what is there.
    :param gpu_memory: GPU budget to check against (e.g. ``"8GB"``); default: free memory under the
        process's cap (``torch.cuda.set_per_process_memory_fraction``).
    :param host_memory: host budget to check against; default: available RAM.
    :param profile: time copies and compute with CUDA events (``engine.profile_totals()``), for benchmarks.
    """

    states: str = "auto"
    loss_chunk_tokens: int = 2048
    check_memory: bool = True
    gpu_memory: str | None = None
    host_memory: str | None = None
    profile: bool = False

    def __post_init__(self):
        if self.states not in ("auto", "fp32", "8bit"):
            raise ValueError(f"states must be auto, fp32 or 8bit, got {self.states!r}")
        if int(self.loss_chunk_tokens) < 1:
            raise ValueError("loss_chunk_tokens must be >= 1")


def parse_bytes(text: str | int | float | None) -> int | None:
    """``"8GB"`` / ``"8GiB"`` / ``"512MB"`` / a number of bytes -> bytes (GB is read as GiB, as people mean it)."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    for unit, mult in (("TIB", 2**40), ("TB", 2**40), ("GIB", GiB), ("GB", GiB), ("G", GiB), ("MIB", 2**20),
                       ("MB", 2**20), ("M", 2**20), ("KIB", 1024), ("KB", 1024), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(float(s))
