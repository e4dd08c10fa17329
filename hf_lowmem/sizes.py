"""Sizes, the one place they are read and written.

Units are taken exactly as written, as the rest of the Hugging Face ecosystem reads them
(``accelerate.utils.convert_file_size_to_int``): ``GB`` is 10^9 bytes, ``GiB`` is 2^30. A GPU sold as
"8 GB" has 8 GiB of memory, so write ``8GiB`` for it (``8GB`` is 7.45 GiB). A bare number in a string
(``"8"``) is refused with a hint, since it is rarely meant as bytes.
"""

from __future__ import annotations

import math
import re
from typing import Any

from hf_lowmem.errors import PluginError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)(b?)|(b))?\s*$", re.IGNORECASE)
#: an integer below this many bytes is almost certainly a size in GiB given without its unit
_SMALLEST_PLAUSIBLE_BYTES = MiB


def parse_size(value: Any, what: str = "memory size") -> int:
    """``"8GiB"`` -> 8 * 2^30, ``"8GB"`` -> 8 * 10^9, ``"512MiB"``, ``"1.5TB"``, ``"64G"`` (a bare letter
    is binary, as in ``free -g``) -> bytes. An ``int`` is a number of bytes (at least 1 MiB).

    Raises :class:`~hf_lowmem.errors.PluginError` with one line saying how to write it."""
    if value is None or isinstance(value, bool):
        raise PluginError(f"{what}: expected a size like 8GiB, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise PluginError(f"{what} must be a positive size like 8GiB, got {value!r}")
        if value < _SMALLEST_PLAUSIBLE_BYTES:
            raise PluginError(f"{what}={value!r} is read as {value!r} bytes; write the unit, e.g. '{value:g}GiB'")
        return int(value)
    text = str(value)
    m = _SIZE.match(text)
    if not m:
        raise PluginError(f"{what}: cannot read {text!r} as a size; write it like 8GiB, 8GB (10^9 bytes), 512MiB or 64G")
    number = float(m.group(1))
    letter, binary, byte_b, plain_b = m.group(2), m.group(3), m.group(4), m.group(5)
    if letter is None and plain_b is None:
        raise PluginError(f"{what}: {text!r} has no unit; write '{text.strip()}GiB' (2^30 bytes each) "
                          f"or '{text.strip()}GB' (10^9 bytes each)")
    if number <= 0:
        raise PluginError(f"{what} must be positive, got {text!r}")
    if plain_b is not None:
        return int(number)
    letter = letter.lower()
    table = _BINARY if (binary or not byte_b) else _DECIMAL  # "GiB" and "G" binary, "GB" decimal
    return int(number * table[letter])


def fmt_size(nbytes: float) -> str:
    """``8.00 GiB``, ``536.0 MiB``, ``12.0 KiB``, ``512 B``: readable at any scale."""
    for unit, mult in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= mult:
            return f"{nbytes / mult:.2f} {unit}" if unit in ("GiB", "TiB") else f"{nbytes / mult:.1f} {unit}"
    return f"{int(nbytes)} B"


def fmt_count(n: float) -> str:
    """A parameter or token count: ``6.74B``, ``135M``, ``2.1M``, ``48.3K``, ``812``."""
    for unit, mult in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= mult:
            v = n / mult
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def gib(nbytes: float) -> float:
    """``nbytes`` in GiB."""
    return nbytes / GiB


def fmt_gib(nbytes: float, digits: int = 2) -> str:
    """``nbytes`` as a number of GiB, for tables (``"8.00"``)."""
    return f"{nbytes / GiB:.{digits}f}"


def gib_up(nbytes: float) -> float:
    """``nbytes`` in GiB, rounded up to 0.1 (a budget that is at least ``nbytes``)."""
    return math.ceil(nbytes / GiB * 10 - 1e-9) / 10


def size_arg(nbytes: float) -> str:
    """A budget argument at least ``nbytes`` that :func:`parse_size` reads back: GiB rounded up to 0.1, or MiB
    below 1 GiB."""
    if nbytes >= GiB:
        return f"{gib_up(nbytes):g}GiB"
    return f"{max(1, math.ceil(nbytes / MiB))}MiB"


def fmt_seconds(seconds: float) -> str:
    """A duration at any scale: ``2.4 h``, ``12.5 min``, ``3.21 s``, ``41.7 ms``, ``380 µs``."""
    s = float(seconds)
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"
