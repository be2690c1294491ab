"""Broken hardware/model files: every error names the file, the key path and what was expected,
in one line, without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.config.kinds import load_any
from core.config import ConfigError
from nodes.profiles import HARDWARE_DIR, MODEL_DIR, load_hardware, load_model

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

REPO = Path(__file__).resolve().parent.parent


def _shipped(kind_dir: Path, name: str) -> dict:
    return yaml.safe_load((kind_dir / f"{name}.yaml").read_text())


def _write(tmp_path: Path, data: dict | str, name: str = "profile.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_any(path)
    return str(info.value)


def test_invalid_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: hardware\nname: x\npeak_flops: {bf16: 667TFLOPS\n")
    msg = _error(path)
    assert msg.startswith(f"{path}: ") and "invalid YAML at line" in msg


def test_unknown_key(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "trn2")
    data["efficiency"]["mfu"] = 0.5
    msg = _error(_write(tmp_path, data))
    assert "efficiency.mfu: unknown key" in msg and str(tmp_path) in msg


def test_wrong_type(tmp_path: Path) -> None:
    data = _shipped(MODEL_DIR, "llama-3.1-8b")
    data["layers"] = "many"
    msg = _error(_write(tmp_path, data))
    assert f"{tmp_path / 'profile.yaml'}: layers:" in msg and "integer" in msg


def test_bad_unit_names_key_and_expectation(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "h200")
    data["memory_bandwidth"] = "4.8 TB"
    msg = _error(_write(tmp_path, data))
    assert "memory_bandwidth:" in msg and "bandwidth" in msg and "'4.8 TB'" in msg


def test_bare_number_is_refused(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "cs3")
    data["multi_system"]["hop_latency"] = 10
    msg = _error(_write(tmp_path, data))
    assert "multi_system.hop_latency:" in msg and "bare number" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "trn2")
    del data["efa_nics"]
    assert "efa_nics: required key is missing" in _error(_write(tmp_path, data))


def test_unknown_kind(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, {"kind": "gpu", "name": "x"}))
    assert "kind: expected one of" in msg


def test_published_numbers_need_sources(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "trn2")
    del data["sources"]["memory_bandwidth"]
    msg = _error(_write(tmp_path, data))
    assert "sources must name where each number comes from" in msg and "memory_bandwidth" in msg


def test_source_for_a_key_that_does_not_exist(tmp_path: Path) -> None:
    data = _shipped(MODEL_DIR, "qwen3-32b")
    data["sources"]["layerz"] = "typo"
    assert "layerz" in _error(_write(tmp_path, data))


def test_architecture_must_add_up_to_the_stated_parameters(tmp_path: Path) -> None:
    data = _shipped(MODEL_DIR, "llama-3.1-70b")
    data["intermediate_size"] = 14336  # a typo that halves the MLP
    msg = _error(_write(tmp_path, data))
    assert "parameters" in msg and "70.60B" in msg


def test_moe_top_k_above_experts(tmp_path: Path) -> None:
    data = _shipped(MODEL_DIR, "mixtral-8x7b")
    data["moe"]["experts_per_token"] = 9
    assert "moe: " in _error(_write(tmp_path, data))


def test_multi_chip_node_needs_an_interconnect(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "h200x8")
    del data["interconnect"]
    del data["sources"]["interconnect"]
    assert "interconnect" in _error(_write(tmp_path, data))


def test_hostile_name_is_refused(tmp_path: Path) -> None:
    data = _shipped(MODEL_DIR, "llama-3.1-8b")
    data["name"] = "x; rm -rf /"
    assert "name:" in _error(_write(tmp_path, data))


def test_kind_mismatch_when_loading_by_path(tmp_path: Path) -> None:
    path = _write(tmp_path, _shipped(MODEL_DIR, "llama-3.1-8b"))
    with pytest.raises(ConfigError) as info:
        load_hardware(path)
    assert "kind: expected 'hardware'" in str(info.value)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_model("llama-9")
    assert "llama-3.1-8b" in str(info.value)


def test_pdtb_validate_reports_one_line_without_traceback(tmp_path: Path) -> None:
    data = _shipped(HARDWARE_DIR, "trn2")
    data["interconnect"]["latency"] = "twenty"
    path = _write(tmp_path, data, "broken.yaml")
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "validate", str(path)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(path) in lines[0] and "interconnect.latency" in lines[0]
    assert "Traceback" not in out.stderr


def test_pdtb_validate_accepts_every_shipped_profile() -> None:
    files = sorted(str(p) for p in list(HARDWARE_DIR.glob("*.yaml")) + list(MODEL_DIR.glob("*.yaml")))
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "validate", *files],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ok: ") == len(files)
