"""Parsing of quantities with explicit units, as written in configs.

Every quantity in a config carries its unit (``3.2Tbps``, ``15us``, ``96GiB``,
``667TFLOPS``); a bare number is refused so a value can never be read in the wrong
unit. Parsed values are plain floats/ints in SI base units: bit/s, seconds, bytes,
FLOP/s. ``Annotated`` aliases let pydantic models declare such fields directly.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Any, Callable

from pydantic import BeforeValidator, PlainSerializer

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)"
_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>[A-Za-z/%]+)\s*$")

_SI = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_IEC = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}

BANDWIDTH_UNITS: dict[str, float] = {
    **{f"{p}bps": m for p, m in _SI.items()},
    **{f"{p}bit/s": m for p, m in _SI.items()},
    **{f"{p}Bps": 8 * m for p, m in _SI.items()},
    **{f"{p}B/s": 8 * m for p, m in _SI.items()},
}
DURATION_UNITS: dict[str, float] = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
BYTE_UNITS: dict[str, float] = {
    **{f"{p}B": m for p, m in _SI.items()},
    **{f"{p}B": float(m) for p, m in _IEC.items()},
}
FLOPS_UNITS: dict[str, float] = {f"{p}FLOPS": m for p, m in _SI.items()}
RATIO_UNITS: dict[str, float] = {"%": 0.01}


class UnitError(ValueError):
    """A quantity string that is not a number followed by one of the allowed units."""


def _parse(value: Any, units: dict[str, float], kind: str, example: str) -> float:
    if isinstance(value, bool):
        raise UnitError(f"expected a {kind} with a unit such as {example!r}, got {value!r}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0  # zero is the same in every unit
        raise UnitError(f"expected a {kind} with a unit such as {example!r}, got bare number {value!r}")
    if not isinstance(value, str):
        raise UnitError(f"expected a {kind} string such as {example!r}, got {type(value).__name__}")
    match = _PATTERN.match(value)
    if not match:
        raise UnitError(f"expected a {kind} such as {example!r}, got {value!r}")
    unit = match["unit"]
    if unit not in units:
        raise UnitError(f"unknown {kind} unit {unit!r} in {value!r}; allowed: {', '.join(sorted(set(units), key=lambda u: (units[u], u)))}")
    result = float(match["num"]) * units[unit]
    if not math.isfinite(result):
        raise UnitError(f"{kind} {value!r} is not finite")
    return result


def parse_bandwidth(value: Any) -> float:
    """``'3.2Tbps'`` -> 3.2e12 bit/s. Byte rates (``'2.9TB/s'``) are converted to bits."""
    return _parse(value, BANDWIDTH_UNITS, "bandwidth", "400Gbps")


def parse_byte_rate(value: Any) -> float:
    """``'2.9TB/s'`` -> 2.9e12 byte/s (memory bandwidths); bit rates are converted too."""
    return parse_bandwidth(value) / 8.0


def parse_duration(value: Any) -> float:
    """``'15us'`` -> 1.5e-05 s."""
    return _parse(value, DURATION_UNITS, "duration", "15us")


def parse_bytes(value: Any) -> int:
    """``'96GiB'`` -> 103079215104; ``'44GB'`` -> 44000000000 (SI and IEC prefixes both)."""
    return int(round(_parse(value, BYTE_UNITS, "size", "96GiB")))


def parse_flops(value: Any) -> float:
    """``'667TFLOPS'`` -> 6.67e14 FLOP/s."""
    return _parse(value, FLOPS_UNITS, "compute rate", "667TFLOPS")


def parse_ratio(value: Any) -> float:
    """A probability: ``'1%'`` -> 0.01, or a plain number in [0, 1]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        result = _parse(value, RATIO_UNITS, "ratio", "1%")
    if not 0.0 <= result <= 1.0:
        raise UnitError(f"expected a ratio between 0 and 1 (or 0% and 100%), got {value!r}")
    return result


def _format(value: float, units: list[tuple[str, float]]) -> str:
    for unit, factor in units:
        if abs(value) >= factor:
            return f"{value / factor:.6g}{unit}"
    return f"{value / units[-1][1]:.6g}{units[-1][0]}"


def format_bandwidth(bps: float) -> str:
    return _format(bps, [("Tbps", 1e12), ("Gbps", 1e9), ("Mbps", 1e6), ("kbps", 1e3), ("bps", 1.0)])


def format_byte_rate(bytes_per_s: float) -> str:
    return _format(bytes_per_s, [("PB/s", 1e15), ("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3), ("B/s", 1.0)])


def format_duration(seconds: float) -> str:
    return _format(seconds, [("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)])


def format_bytes(n: float) -> str:
    """Binary units, except for whole decimal sizes (``44GB`` stays ``44GB``)."""
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= factor and n % factor == 0 and n % 2**20 != 0:
            return f"{n / factor:.6g}{unit}"
    return _format(n, [("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0)])


def format_flops(flops: float) -> str:
    return _format(flops, [("PFLOPS", 1e15), ("TFLOPS", 1e12), ("GFLOPS", 1e9), ("FLOPS", 1.0)])


def _unit_type(parser: Callable[[Any], Any], formatter: Callable[[Any], str], base: type) -> Any:
    return Annotated[base, BeforeValidator(parser), PlainSerializer(formatter, return_type=str, when_used="json")]


Bandwidth = _unit_type(parse_bandwidth, format_bandwidth, float)
"""bit/s, written with a unit in configs."""
ByteRate = _unit_type(parse_byte_rate, format_byte_rate, float)
"""byte/s (memory bandwidths), written with a unit in configs."""
Duration = _unit_type(parse_duration, format_duration, float)
"""seconds, written with a unit in configs."""
ByteSize = _unit_type(parse_bytes, format_bytes, int)
"""bytes, written with a unit in configs."""
FlopRate = _unit_type(parse_flops, format_flops, float)
"""FLOP/s, written with a unit in configs."""
Ratio = Annotated[float, BeforeValidator(parse_ratio)]
"""a probability in [0, 1], written as ``'1%'`` or ``0.01``."""
