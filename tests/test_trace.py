"""Azure trace reading and replay: the file's arrivals and lengths, windows, speed-up, sampling, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError
from testbed.trace import parse_timestamp_ns, read_trace, replay

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

SMALL = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:04.0781490,110,27
2023-11-16 18:17:05.1206447,7433,14
2023-11-16 18:17:10.0000000,12,1
"""


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_timestamp_keeps_all_seven_digits() -> None:
    a = parse_timestamp_ns("2023-11-16 18:17:03.9799600")
    b = parse_timestamp_ns("2023-11-16 18:17:03.9799601")
    assert b - a == 100  # 1e-7 s, which datetime (microseconds) would lose
    assert parse_timestamp_ns("1970-01-01 00:00:01") == 1_000_000_000
    assert parse_timestamp_ns("2023-11-17 00:00:00.0000000") - parse_timestamp_ns("2023-11-16 23:59:59.5") == 500_000_000
    for bad in ("2023-13-01 00:00:00", "2023-02-30 00:00:00.1", "yesterday", "2023-11-16 25:00:00"):
        with pytest.raises(ValueError):
            parse_timestamp_ns(bad)


def test_reads_arrivals_and_lengths(tmp_path: Path) -> None:
    recs = read_trace(write(tmp_path, SMALL))
    assert [r.prompt_tokens for r in recs] == [4808, 3180, 110, 7433, 12]
    assert [r.output_tokens for r in recs] == [10, 8, 27, 14, 1]
    assert [r.t_ns for r in recs] == [0, 52_000_000, 98_189_000, 1_140_684_700, 6_020_040_000]
    assert recs[1].line == 3


def test_columns_in_other_order_and_extra_columns(tmp_path: Path) -> None:
    text = "GeneratedTokens,Extra,TIMESTAMP,ContextTokens\n5,x,2023-01-01 00:00:00.5,100\n6,y,2023-01-01 00:00:00.0,200\n"
    recs = read_trace(write(tmp_path, text))
    assert [(r.t_ns, r.prompt_tokens, r.output_tokens, r.line) for r in recs] == [(0, 200, 6, 3), (500_000_000, 100, 5, 2)]


@pytest.mark.parametrize("row, message", [
    ("2023-11-16 18:17:04.0,abc,3", "ContextTokens"),
    ("2023-11-16 18:17:04.0,10,0", "GeneratedTokens"),
    ("not-a-time,10,3", "timestamp"),
    ("2023-11-16 18:17:04.0,10", "columns"),
])
def test_malformed_row_names_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    path = write(tmp_path, SMALL + row + "\n")
    with pytest.raises(ConfigError) as err:
        read_trace(path)
    text = str(err.value)
    assert str(path) in text and "line 7" in text and message in text


def test_bad_header_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="header lacks column"):
        read_trace(write(tmp_path, "time,prompt,output\n1,2,3\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_trace(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match="no requests"):
        read_trace(write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n"))


def test_replay_window_speedup_and_caps(tmp_path: Path) -> None:
    recs = read_trace(write(tmp_path, SMALL))
    full = replay(recs)
    assert [r.arrival_s for r in full] == pytest.approx([0, 0.052, 0.098189, 1.1406847, 6.02004])
    w = replay(recs, start_s=0.05, window_s=1.1, speedup=2.0)
    assert [r.prompt_tokens for r in w] == [3180, 110, 7433]
    assert [r.arrival_s for r in w] == pytest.approx([0.001, 0.0240945, 0.54534235])
    assert len(replay(recs, max_requests=2)) == 2
    assert [r.prompt_tokens for r in replay(recs, max_arrival_s=1.0)] == [4808, 3180, 110]


def test_sampling_is_seeded_and_near_fraction(tmp_path: Path) -> None:
    lines = ["TIMESTAMP,ContextTokens,GeneratedTokens"] + [
        f"2023-11-16 18:{i // 600:02d}:{(i // 10) % 60:02d}.{i % 10}000000,{100 + i},{1 + i % 7}" for i in range(4000)]
    recs = read_trace(write(tmp_path, "\n".join(lines) + "\n"))
    a = replay(recs, sample=0.25, seed=3)
    assert a == replay(recs, sample=0.25, seed=3)
    assert a != replay(recs, sample=0.25, seed=4)
    assert 0.22 * 4000 < len(a) < 0.28 * 4000
    kept = {r.prompt_tokens for r in a}
    assert all(r.output_tokens == 1 + (r.prompt_tokens - 100) % 7 for r in a) and len(kept) == len(a)


def test_shared_azure_code_trace(shared_trace: Path) -> None:
    recs = read_trace(shared_trace)
    assert len(recs) == 8819
    assert (recs[0].prompt_tokens, recs[0].output_tokens) == (4808, 10)
    assert (recs[-1].prompt_tokens, recs[-1].output_tokens) == (549, 173)
    # 18:17:03.9799600 -> 19:14:19.9280160
    assert recs[-1].t_ns == ((19 - 18) * 3600 + (14 - 17) * 60 + (19 - 3)) * 10**9 + 928_016_000 - 979_960_000
    assert all(a.t_ns <= b.t_ns for a, b in zip(recs, recs[1:]))


def test_shared_trace_replay_reproduces_every_row(shared_trace: Path) -> None:
    """A full replay gives every row's lengths and its time since the first row, to 100 ns."""
    from datetime import datetime

    rows = [line.split(",") for line in shared_trace.read_text().splitlines()[1:] if line.strip()]

    def ns(ts: str) -> int:  # datetime keeps microseconds; the 7th digit is added by hand
        return round(datetime.strptime(ts[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp() * 1e6) * 1000 + int(ts[26]) * 100

    t0 = ns(rows[0][0])
    replayed = replay(read_trace(shared_trace))
    assert len(replayed) == len(rows)
    for r, row in zip(replayed, rows):
        assert (r.prompt_tokens, r.output_tokens) == (int(row[1]), int(row[2]))
        assert round(r.arrival_s * 1e9) == pytest.approx(ns(row[0]) - t0, abs=2)
