"""Quantities in configs: every unit the profiles use parses to SI, and bad strings are refused."""
from __future__ import annotations

import pytest

from core.units import (UnitError, parse_bandwidth, parse_byte_rate, parse_bytes, parse_duration, parse_flops,
                           parse_ratio)
from nodes.profiles.models import parse_count

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py


@pytest.mark.parametrize("text, expected", [
    ("3.2Tbps", 3.2e12), ("400Gbps", 400e9), ("1.2Tbit/s", 1.2e12), ("100 Mbps", 100e6), ("1bps", 1.0),
    ("2.9TB/s", 2.9e12 * 8), (0, 0.0),
])
def test_bandwidth(text: str, expected: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("2.9TB/s", 2.9e12), ("21PB/s", 21e15), ("880.5GB/s", 880.5e9),
                                            ("8Gbps", 1e9)])
def test_byte_rate(text: str, expected: float) -> None:
    assert parse_byte_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("15us", 15e-6), ("2ms", 2e-3), ("1.5s", 1.5), ("10ns", 1e-8),
                                            ("2min", 120.0), ("148.6ms", 0.1486)])
def test_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("96GiB", 96 * 2**30), ("44GB", 44_000_000_000), ("224MiB", 224 * 2**20),
                                            ("1.5TiB", int(1.5 * 2**40)), ("512B", 512)])
def test_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text, expected", [("667TFLOPS", 667e12), ("125PFLOPS", 125e15), ("1.2GFLOPS", 1.2e9)])
def test_flops(text: str, expected: float) -> None:
    assert parse_flops(text) == pytest.approx(expected)


@pytest.mark.parametrize("value, expected", [("90%", 0.9), (0.25, 0.25), (1, 1.0), ("0%", 0.0)])
def test_ratio(value: object, expected: float) -> None:
    assert parse_ratio(value) == pytest.approx(expected)


@pytest.mark.parametrize("text, expected", [("8.03B", 8_030_000_000), ("46.7B", 46_700_000_000), ("405M", 405_000_000),
                                            ("1T", 10**12), (1234, 1234)])
def test_parameter_count(text: object, expected: int) -> None:
    assert parse_count(text) == expected


@pytest.mark.parametrize("parser, value", [
    (parse_bandwidth, "3.2"), (parse_bandwidth, 400), (parse_bandwidth, "3.2 TB"), (parse_bandwidth, "fast"),
    (parse_bandwidth, "-1Gbps"), (parse_bandwidth, True), (parse_bandwidth, None),
    (parse_duration, "15"), (parse_duration, "15 parsecs"), (parse_duration, 2), (parse_duration, "ms"),
    (parse_bytes, "96G"), (parse_bytes, "96gib"), (parse_bytes, 96), (parse_bytes, "1e999GB"),
    (parse_flops, "667TFLOP"), (parse_flops, "667 teraflops"), (parse_flops, "667"),
    (parse_byte_rate, "2.9TB"), (parse_ratio, "150%"), (parse_ratio, 1.5), (parse_ratio, "half"),
])
def test_bad_quantities_are_refused(parser, value) -> None:
    with pytest.raises(UnitError):
        parser(value)


@pytest.mark.parametrize("value", ["8.03", "8.03 billion", "B", "-8B", True, 1.5])
def test_bad_parameter_count(value: object) -> None:
    with pytest.raises(ValueError):
        parse_count(value)


def test_error_names_the_allowed_units() -> None:
    with pytest.raises(UnitError) as info:
        parse_duration("15 parsecs")
    assert "us" in str(info.value) and "ms" in str(info.value)
