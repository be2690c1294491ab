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
    n = len(reference_points())
    assert f"{n} of {n} points within tolerance" in out.stdout
    # fitted and validation points in separate tables, the fitted ones with leave-one-out errors
    fitted_at, validation_at = out.stdout.index("FITTED points"), out.stdout.index("VALIDATION points")
    assert fitted_at < validation_at and " loo " in out.stdout.splitlines()[1] + " "


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
    assert main(["profiles", "validate", "--no-loo"]) == 1


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
    assert spec["tokens_per_s_per_user"] == pytest.approx(spec["tokens_per_step"] / spec["round_ms"] * 1e3)
    assert spec["tokens_per_s_per_user"] > plain["tokens_per_s_per_user"]
    # fused speculation: the draft's device time, one verification, the round's fixed cost once
    assert spec["round_ms"] == pytest.approx(spec["draft_ms"] + spec["verify_ms"] + spec["round_overhead_ms"])
    out = pdtb(*base, "--draft-model", "llama-3.1-8b", "--acceptance-rate", "1.5")
    assert out.returncode != 0 and "--acceptance-rate" in out.stderr and "Traceback" not in out.stderr


def test_validate_says_which_points_were_fitted() -> None:
    out = pdtb("profiles", "validate", "--json", "--no-loo")
    data = json.loads(out.stdout)
    points = data["points"]
    assert {p["role"] for p in points} == {"fitted", "validation"}
    for family in ("trn2", "cs3"):
        mine = [p for p in points if p["hardware"].startswith(family)]
        group = next(g for g in data["fit_groups"] if g["group"] == family)
        # fewer free constants than fitted points, and validation points kept out of the fit
        assert len(group["constants"]) < group["fitted_points"]
        assert group["validation_points"] >= 1
        assert len(mine) == group["fitted_points"] + group["validation_points"]
        assert any(p["speculative"] for p in mine) and any(not p["speculative"] for p in mine)


def test_every_fitted_constant_names_points_of_its_own_family() -> None:
    from nodes.calibration import FIT_GROUPS, reference_points
    by_id = {p.id: p for p in reference_points()}
    assert len(by_id) == len(reference_points())  # ids are unique
    for g in FIT_GROUPS:
        for name in g.profiles:
            for key, ids in load_hardware(name).fitted.items():
                for i in ids:
                    assert i in by_id, (name, key, i)
                    assert by_id[i].role == "fitted" and by_id[i].hardware in g.profiles, (name, key, i)
        # every fitted point of the group is used by some constant
        used = {i for n in g.profiles for ids in load_hardware(n).fitted.values() for i in ids}
        assert used == {p.id for p in reference_points() if p.hardware in g.profiles and p.role == "fitted"}


def test_shipped_constants_are_the_fit() -> None:
    """Refitting each family to its fitted points reproduces the shipped constants (within 2 %)."""
    from nodes.calibration import FIT_GROUPS, fit
    from nodes.profiles.hardware import get_constant
    for g in FIT_GROUPS:
        values = fit(g)
        for key, value in values.items():
            shipped = next(get_constant(load_hardware(n), key) for n in g.profiles if key in load_hardware(n).fitted)
            assert value == pytest.approx(shipped, rel=0.02), (g.name, key)


def test_leave_one_out_reports_each_fitted_point() -> None:
    from nodes.calibration import FIT_GROUPS, group_points, leave_one_out
    g = next(g for g in FIT_GROUPS if g.name == "cs3")
    loo = leave_one_out(g)
    fitted = {p.id for p in group_points(g)}
    assert set(loo) == fitted
    # without the 405B point nothing pins the hop latency between systems: underdetermined
    assert loo["cs3-405b-spec"] is None
    assert loo["cs3-70b-launch"] is not None and abs(loo["cs3-70b-launch"]) < 0.05


def test_validate_fails_when_a_validation_point_is_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A validation point 30 % away from what the model says makes validate exit 1, and only that point fails."""
    from testbed.cli import main
    src = calibration.PUBLISHED_CSV.read_text().splitlines()
    rows = []
    for line in src:
        if line.startswith("cs3-3.3-70b-spec,"):
            line = line.replace(",2314,", ",3008,")
        rows.append(line)
    bad = tmp_path / "points.csv"
    bad.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(calibration, "PUBLISHED_CSV", bad)
    failed = [r for r in check(loo=False) if not r.ok]
    assert [r.point.id for r in failed] == ["cs3-3.3-70b-spec"] and failed[0].point.role == "validation"
    assert main(["profiles", "validate", "--no-loo"]) == 1


def test_spec_profiles_are_their_base_plus_speculation() -> None:
    """trn2-spec and cs3-spec differ from trn2 and cs3 only in decode.speculative (and naming);
    cs3-spec's acceptance rate is trn2-spec's fit (same draft and target family)."""
    for base in ("trn2", "cs3"):
        a, b = load_hardware(base), load_hardware(f"{base}-spec")
        da, db = a.model_dump(), b.model_dump()
        assert db["decode"].pop("speculative") is not None and da["decode"].pop("speculative") is None
        for key in ("name", "description", "sources", "fitted"):
            da.pop(key), db.pop(key)
        assert da == db
    assert load_hardware("cs3-spec").decode.speculative == load_hardware("trn2-spec").decode.speculative
