"""Replay of LLM inference traces in the Azure public dataset format.

The CSV has a header with ``TIMESTAMP,ContextTokens,GeneratedTokens`` (other columns,
in any order, are ignored) and one request per row; timestamps look like
``2023-11-16 18:17:03.9799600`` (7 fractional digits, more than ``datetime`` keeps), so
they are parsed by hand into integer nanoseconds. Arrival times are relative to the
trace's first request; a replay picks a window, speeds it up and samples it.
"""
from __future__ import annotations

import calendar
import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.config import ConfigError

COLUMNS: tuple[str, str, str] = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_TIMESTAMP = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(?:Z|\+00:?00)?\s*$")


@dataclass(frozen=True)
class TraceRecord:
    line: int  # line number in the file (the header is line 1)
    t_ns: int  # nanoseconds since the trace's first request
    prompt_tokens: int
    output_tokens: int

    @property
    def t_s(self) -> float:
        return self.t_ns / 1e9


def parse_timestamp_ns(text: str) -> int:
    """``'2023-11-16 18:17:03.9799600'`` -> nanoseconds since the Unix epoch (UTC), exactly."""
    m = _TIMESTAMP.match(text)
    if not m:
        raise ValueError(f"expected a timestamp like '2023-11-16 18:17:03.9799600', got {text!r}")
    year, month, day, hour, minute, second = (int(m[i]) for i in range(1, 7))
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 61):
        raise ValueError(f"timestamp {text!r} is not a valid date and time")
    frac = (m[7] or "").ljust(9, "0")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    return seconds * 1_000_000_000 + int(frac)


def _count(text: str, column: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{column}: expected a whole number of tokens, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{column}: expected at least 1 token, got {value}")
    return value


def read_trace(path: str | Path) -> list[TraceRecord]:
    """All requests of a trace file, sorted by time, times relative to the first request."""
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read trace file: {exc.strerror}")]) from None
    rows: list[tuple[int, int, int, int]] = []
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ConfigError(str(path), [("line 1", f"empty file; expected the header {','.join(COLUMNS)}")])
        names = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ConfigError(str(path), [("line 1", f"header lacks column(s) {', '.join(missing)}; expected "
                                                     f"{','.join(COLUMNS)}, got {','.join(names)}")])
        col = {c: names.index(c) for c in COLUMNS}
        width = max(col.values()) + 1
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) < width:
                raise ConfigError(str(path), [(f"line {line}", f"expected {len(names)} columns, got {len(row)}")])
            try:
                t = parse_timestamp_ns(row[col["TIMESTAMP"]])
                prompt = _count(row[col["ContextTokens"]], "ContextTokens")
                output = _count(row[col["GeneratedTokens"]], "GeneratedTokens")
            except ValueError as exc:
                raise ConfigError(str(path), [(f"line {line}", str(exc))]) from None
            rows.append((t, line, prompt, output))
    if not rows:
        raise ConfigError(str(path), [("", "the trace has no requests")])
    rows.sort()
    t0 = rows[0][0]
    return [TraceRecord(line=line, t_ns=t - t0, prompt_tokens=p, output_tokens=o) for t, line, p, o in rows]


@dataclass(frozen=True)
class ReplayedRequest:
    arrival_s: float  # model seconds from the start of the replay
    prompt_tokens: int
    output_tokens: int
    line: int


def replay(records: list[TraceRecord], *, start_s: float = 0.0, window_s: float | None = None,
           speedup: float = 1.0, sample: float = 1.0, seed: int = 0,
           max_requests: int | None = None, max_arrival_s: float | None = None) -> list[ReplayedRequest]:
    """Requests of the trace window ``[start, start + window)`` (trace seconds), sped up and sampled.

    Model arrival = (trace time - start) / speedup. Sampling keeps each request with
    probability ``sample`` (seeded, so a replay is reproducible). ``max_requests`` and
    ``max_arrival_s`` (model time) cap the result.
    """
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    start_ns = round(start_s * 1e9)
    end_ns = None if window_s is None else start_ns + round(window_s * 1e9)
    rng = np.random.default_rng([seed, 0x7ace])
    out: list[ReplayedRequest] = []
    for rec in records:
        if rec.t_ns < start_ns:
            continue
        if end_ns is not None and rec.t_ns >= end_ns:
            break
        if sample < 1.0 and rng.random() >= sample:
            continue
        arrival = (rec.t_ns - start_ns) / 1e9 / speedup
        if max_arrival_s is not None and arrival >= max_arrival_s:
            break
        out.append(ReplayedRequest(arrival, rec.prompt_tokens, rec.output_tokens, rec.line))
        if max_requests is not None and len(out) >= max_requests:
            break
    return out
