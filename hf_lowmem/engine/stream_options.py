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
        _check_int(self, "loss_chunk_tokens", 1)
        for name in ("check_memory", "profile"):
            if not isinstance(getattr(self, name), bool):  # "no" is a true string: refuse it instead of guessing
                raise ValueError(f"{name} must be true or false (a JSON boolean), got {getattr(self, name)!r}")
        for name in ("gpu_memory", "host_memory"):
            _check_size(name, getattr(self, name))


def _check_int(opts, name: str, lo: int) -> None:
    v = getattr(opts, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _check_size(name: str, value) -> None:
    """A size option is read here, at construction, so a bad one fails before any model is touched."""
    if value is None:
        return
    if str(value).strip().startswith("-"):
        raise ValueError(f"{name} must be positive, got {value!r}; write a size like '32GiB'")
    from hf_lowmem.errors import PluginError

    try:
        parse_bytes(value, name)
    except PluginError as e:  # the registry reports ValueError as a bad option, with the plugin's name
        raise ValueError(str(e)) from None


def parse_bytes(text: str | int | float | None, what: str = "size") -> int | None:
    """A size option (``"8GiB"``, ``"8GB"`` = 10^9 bytes) in bytes, or ``None`` when unset; see :mod:`hf_lowmem.sizes`."""
    if text is None:
        return None
    from hf_lowmem.sizes import parse_size

    return parse_size(text, what)
