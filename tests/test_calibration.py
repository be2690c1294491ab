"""Calibration: every reference point inside its tolerance, and the CLI that reports them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodes import calibration
from nodes.calibration import PACKAGED_CSV, SHARED_CSV, check, h200_points, predict_point, reference_points
from nodes.profiles import load_hardware, load_model

REPO = Path(__file__).resolve().parent.parent


def pdtb(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_reference_points_cover_the_issue() -> None:
    points = reference_points()
    keys = {(p.hardware, p.model, p.metric) for p in points}
    assert {("trn2", "llama-3.3-70b", "ttft_ms"), ("trn2", "llama-3.3-70b", "itl_ms"),
            ("trn2", "llama-3.1-405b", "ttft_ms"), ("trn2", "llama-3.1-405b", "itl_ms"),
            ("cs3", "llama-3.1-8b", "tok_per_s_per_user"), ("cs3", "llama-3.1-70b", "tok_per_s_per_user")} <= keys
    # every prefill and decode row of the H200 measurement
    assert len(h200_points()) == 12
    assert all(p.source for p in points)


@pytest.mark.parametrize("point", reference_points(), ids=lambda p: f"{p.hardware}-{p.model}-{p.label}")
def test_point_within_tolerance(point) -> None:
    predicted, _ = predict_point(point)
    assert abs(predicted / point.value - 1.0) <= point.tolerance


def test_aim_for_ten_percent() -> None:
    assert all(abs(r.error) <= 0.10 for r in check())


def test_packaged_csv_is_a_copy_of_the_shared_one() -> None:
    if not SHARED_CSV.is_file():
        pytest.skip("shared/ is not beside this checkout")
    assert PACKAGED_CSV.read_bytes() == SHARED_CSV.read_bytes()


def test_packaged_csv_is_used_without_shared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(calibration, "SHARED_CSV", tmp_path / "missing.csv")
    assert calibration.calibration_csv() == PACKAGED_CSV
    assert len(h200_points()) == 12


def test_predictions_come_from_the_model_not_the_rows() -> None:
    """Halving the H200's memory efficiency must move every memory-bound decode point."""
    hw = load_hardware("h200")
    slow = hw.model_copy(update={"efficiency": hw.efficiency.model_copy(update={"memory": hw.efficiency.memory / 2})})
    for p in h200_points():
        if p.phase != "decode":
            continue
        base, _ = predict_point(p)
        worse, _ = predict_point(p, slow, load_model(p.model))
        assert worse > base * 1.2


def test_unlisted_h200_shapes_are_plausible() -> None:
    """Between the measured rows the model interpolates smoothly (no row lookup)."""
    from nodes.costmodel import CostModel
    c = CostModel(load_hardware("h200"), load_model("llama-3.1-8b"), include_head=False)
    t2k = c.prefill([2048]).time_s * 1e3
    assert 29.7 < t2k < 116.2  # between the 1024- and 4096-token rows
    d16 = c.decode_step([4096] * 16).time_s * 1e3
    assert 8.0 < d16 < 15.2


def test_cli_validate_table_and_exit_code() -> None:
    out = pdtb("profiles", "validate")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trn2" in out.stdout and "cs3" in out.stdout and "h200" in out.stdout
    assert "FAIL" not in out.stdout
    assert "18 of 18 points within tolerance" in out.stdout


def test_cli_validate_json() -> None:
    out = pdtb("profiles", "validate", "--json")
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data["ok"] is True
    row = data["points"][0]
    assert {"hardware", "model", "metric", "value", "predicted", "error_pct", "source", "ok"} <= set(row)


def test_cli_validate_fails_when_a_point_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mis-calibrated profile makes validate exit 1 (in-process, with a patched loader)."""
    from testbed.cli import main

    real = calibration.load_hardware

    def broken(name: str):
        hw = real(name)
        if name == "cs3":
            return hw.model_copy(update={"decode": hw.decode.model_copy(update={"step": 0.01})})
        return hw

    monkeypatch.setattr(calibration, "load_hardware", broken)
    assert main(["profiles", "validate"]) == 1


def test_cli_predict_json() -> None:
    out = pdtb("profiles", "predict", "--hardware", "h200", "--model", "llama-3.1-70b", "--decode-batch", "4",
               "--context", "2048", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["fits"] is False and data["time_ms"] > 0
    assert {"compute_ms", "memory_ms", "overhead_ms", "comm_ms", "bound", "weight_bytes", "kv_capacity_bytes"} <= set(data)
    out = pdtb("profiles", "predict", "--hardware", "trn2", "--model", "llama-3.3-70b", "--prefill-tokens", "10000",
               "--json")
    data = json.loads(out.stdout)
    assert data["fits"] is True and data["time_ms"] == pytest.approx(576, rel=0.15)
    args = ["profiles", "predict", "--hardware", "h200", "--model", "llama-3.1-8b", "--decode-batch", "1",
            "--context", "1024", "--json"]
    full, blocks = json.loads(pdtb(*args).stdout), json.loads(pdtb(*args, "--blocks-only").stdout)
    assert blocks["time_ms"] == pytest.approx(7.50, rel=0.10)  # the measured row
    assert full["time_ms"] > blocks["time_ms"]  # the LM head's weights are read too


def test_cli_predict_and_list_and_show_text() -> None:
    out = pdtb("profiles", "predict", "--hardware", "cs3", "--model", "llama-3.1-70b", "--decode-batch", "1",
               "--context", "1000")
    assert out.returncode == 0 and "time" in out.stdout and "4 systems" in out.stdout
    out = pdtb("profiles", "list")
    assert out.returncode == 0 and "deepseek-v3" in out.stdout and "trn2" in out.stdout
    out = pdtb("profiles", "show", "mixtral-8x7b")
    assert out.returncode == 0 and "experts: 8" in out.stdout
    out = pdtb("profiles", "show", "trn2", "--json")
    assert json.loads(out.stdout)["chips"] == 16


def test_cli_errors_are_one_line() -> None:
    out = pdtb("profiles", "predict", "--hardware", "h999", "--model", "llama-3.1-8b", "--prefill-tokens", "5")
    assert out.returncode != 0 and "Traceback" not in out.stderr and "h999" in out.stderr
    out = pdtb("profiles", "predict", "--hardware", "h200", "--model", "llama-3.1-8b", "--decode-batch", "2")
    assert out.returncode != 0 and "--context" in out.stderr
    out = pdtb("profiles", "predict", "--hardware", "h200", "--model", "llama-3.1-8b", "--prefill-tokens", "-3")
    assert out.returncode != 0 and "Traceback" not in out.stderr


def test_cli_predict_speculative_decoding() -> None:
    base = ["profiles", "predict", "--hardware", "cs3", "--model", "llama-3.1-405b", "--decode-batch", "1",
            "--context", "1000", "--json"]
    plain = json.loads(pdtb(*base).stdout)
    spec = json.loads(pdtb(*base, "--draft-model", "llama-3.1-8b", "--speculative-k", "4",
                           "--acceptance-rate", "0.8").stdout)
    assert spec["phase"] == "speculative_decode" and spec["tokens_per_step"] == pytest.approx(3.3616)
    assert spec["round_ms"] == pytest.approx(spec["draft_ms"] + spec["time_ms"])
    assert spec["tokens_per_s_per_user"] == pytest.approx(spec["tokens_per_step"] / spec["round_ms"] * 1e3)
    assert spec["tokens_per_s_per_user"] > plain["tokens_per_s_per_user"]
    out = pdtb(*base, "--draft-model", "llama-3.1-8b", "--acceptance-rate", "1.5")
    assert out.returncode != 0 and "--acceptance-rate" in out.stderr and "Traceback" not in out.stderr


def test_validate_says_which_points_were_fitted() -> None:
    out = pdtb("profiles", "validate", "--json")
    points = json.loads(out.stdout)["points"]
    assert {p["role"] for p in points} <= {"fitted", "validation"}
    assert all(p["role"] == "fitted" and p["speculative"] is False for p in points if p["hardware"] == "trn2")
    assert " role " in pdtb("profiles", "validate").stdout.splitlines()[0] + " "
