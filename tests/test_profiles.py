"""Shipped profiles: the names the issue asks for, the brief's figures, and derived quantities."""
from __future__ import annotations

import pytest
from pathlib import Path

from nodes.profiles import hardware_names, load_hardware, load_model, model_names

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

KIB = 1024


def test_shipped_names() -> None:
    assert set(model_names()) >= {"llama-3.1-8b", "llama-3.1-70b", "llama-3.3-70b", "llama-3.1-405b", "qwen3-32b",
                                  "mixtral-8x7b", "deepseek-v3"}
    assert set(hardware_names()) >= {"trn1", "trn2", "trn3", "cs3", "h100", "h200", "h100x8", "h200x8"}


# the brief's table: layers, KV heads x head dim, KV per token at BF16
@pytest.mark.parametrize("name, layers, kv_kib", [
    ("llama-3.1-8b", 32, 128), ("llama-3.1-70b", 80, 320), ("llama-3.3-70b", 80, 320), ("llama-3.1-405b", 126, 504),
    ("qwen3-32b", 64, 256), ("mixtral-8x7b", 32, 128), ("deepseek-v3", 61, 68.625),
])
def test_kv_bytes_per_token_match_the_brief(name: str, layers: int, kv_kib: float) -> None:
    m = load_model(name)
    assert m.layers == layers
    assert m.kv_bytes_per_token == kv_kib * KIB
    assert isinstance(m.kv_bytes_per_token, int)


def test_worked_example_8k_prompt_of_llama_70b() -> None:
    """Brief: an 8k-token Llama-70B prompt has a 2.68 GB KV cache."""
    assert load_model("llama-3.1-70b").kv_bytes_per_token * 8192 == pytest.approx(2.68e9, rel=0.01)


@pytest.mark.parametrize("name, total_b, active_b", [
    ("llama-3.1-8b", 8.03, 8.03), ("llama-3.1-70b", 70.6, 70.6), ("llama-3.1-405b", 405.9, 405.9),
    ("qwen3-32b", 32.8, 32.8), ("mixtral-8x7b", 46.7, 12.9), ("deepseek-v3", 671, 37),
])
def test_parameters_from_the_architecture(name: str, total_b: float, active_b: float) -> None:
    m = load_model(name)
    assert m.total_params / 1e9 == pytest.approx(total_b, rel=0.02)
    assert m.active_params / 1e9 == pytest.approx(active_b, rel=0.02)


def test_weight_bytes_follow_dtype() -> None:
    assert load_model("llama-3.1-70b").weight_bytes == pytest.approx(141.1e9, rel=0.005)  # bf16
    assert load_model("deepseek-v3").weight_bytes == pytest.approx(671e9, rel=0.005)  # fp8
    assert load_model("mixtral-8x7b").weight_bytes == pytest.approx(2 * 46.7e9, rel=0.01)  # all experts held


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen3-32b"])
def test_flops_per_token_is_about_twice_the_parameters(name: str) -> None:
    m = load_model(name)
    # 2 FLOPs per weight except the embedding lookup
    assert m.flops_per_token(0) == pytest.approx(2 * (m.total_params - m.embedding_params), rel=1e-9)
    assert m.flops_per_token(0) == pytest.approx(2 * m.total_params, rel=0.07)


def test_moe_flops_use_active_parameters() -> None:
    m = load_model("mixtral-8x7b")
    assert m.flops_per_token(0) == pytest.approx(2 * 12.9e9, rel=0.03)
    assert load_model("deepseek-v3").flops_per_token(0) == pytest.approx(2 * 37e9, rel=0.03)


def test_attention_flops_grow_linearly_with_context() -> None:
    m = load_model("llama-3.1-70b")
    per_token = 2 * 80 * 64 * (128 + 128)  # QK^T and AV, 2 FLOPs per multiply-add
    assert m.flops_per_token(8192) - m.flops_per_token(0) == pytest.approx(per_token * 8192)
    assert m.flops_per_token(16384) - m.flops_per_token(8192) == pytest.approx(per_token * 8192)
    with pytest.raises(ValueError):
        m.flops_per_token(-1)


def test_moe_touched_experts_grow_with_batch() -> None:
    m = load_model("mixtral-8x7b")
    one, eight, many = (m.touched_block_params(n) for n in (1, 8, 4096))
    assert one == pytest.approx(m.active_block_params)
    assert one < eight < many <= m.block_params
    assert many == pytest.approx(m.block_params, rel=1e-6)


@pytest.mark.parametrize("name, chips, bf16_tflops, mem_gb, bw_tbs, efa_gbps", [
    ("trn2", 16, 667, 96 * 2**30 / 1e9, 2.9, 3200), ("trn1", 16, 190, 32 * 2**30 / 1e9, 0.8805, 800),
    ("trn3", 16, 671, 144 * 2**30 / 1e9, 4.9, 3200), ("h100", 1, 989, 80, 3.35, 400), ("h200", 1, 989, 141, 4.8, 400),
    ("h100x8", 8, 989, 80, 3.35, 3200), ("h200x8", 8, 989, 141, 4.8, 3200), ("cs3", 1, 125000, 44, 21000, 1200),
])
def test_hardware_figures_from_the_brief(name, chips, bf16_tflops, mem_gb, bw_tbs, efa_gbps) -> None:
    hw = load_hardware(name)
    assert hw.chips == chips
    assert hw.peak_flops_for("bf16") == pytest.approx(bf16_tflops * 1e12)
    assert hw.memory_capacity / 1e9 == pytest.approx(mem_gb, rel=1e-3)
    assert hw.memory_bandwidth == pytest.approx(bw_tbs * 1e12, rel=1e-3)
    assert hw.efa_bandwidth_bps == pytest.approx(efa_gbps * 1e9)
    assert isinstance(hw.efa_nics, int) and hw.efa_nics > 0
    assert hw.memory_bytes == chips * hw.memory_capacity


def test_trn2_instance_totals() -> None:
    hw = load_hardware("trn2")
    assert hw.memory_bytes == pytest.approx(1.5 * 2**40)
    assert hw.memory_bandwidth * hw.chips == pytest.approx(46.4e12)
    assert hw.peak_flops_for("fp8") == pytest.approx(1299e12)


def test_cs3_is_sram_with_a_multi_system_pipeline() -> None:
    hw = load_hardware("cs3")
    assert hw.memory_kind == "sram" and hw.multi_system is not None
    assert hw.efa_nics == 12


def test_every_profile_cites_its_published_numbers() -> None:
    for name in hardware_names():
        hw = load_hardware(name)
        for key in ("peak_flops", "memory_capacity", "memory_bandwidth", "efa_bandwidth", "efa_nics", "efficiency"):
            assert hw.sources.get(key), (name, key)
    for name in model_names():
        assert load_model(name).sources.get("parameters"), name


def test_load_by_path_and_name_agree() -> None:
    from nodes.profiles import HARDWARE_DIR
    assert load_hardware(HARDWARE_DIR / "trn2.yaml") == load_hardware("trn2")


def test_profiles_are_immutable() -> None:
    hw = load_hardware("trn2")
    with pytest.raises(Exception):
        hw.chips = 3  # type: ignore[misc]


def test_every_fitted_constant_says_so_and_every_profile_constant_has_a_source() -> None:
    """A constant listed under ``fitted:`` is described as fitted in ``sources`` (its own key or
    the nearest enclosing one); the calibrated blocks of every profile name a source."""
    for name in hardware_names():
        hw = load_hardware(name)
        for key in hw.fitted:
            parts = key.split(".")
            text = next((hw.sources[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                         if ".".join(parts[:i]) in hw.sources), "")
            assert "fitted" in text, (name, key)
        for key in ("efficiency", "prefill", "decode"):
            assert hw.sources.get(key), (name, key)


def test_family_and_instance_configuration_are_profile_data() -> None:
    assert load_hardware("trn2").family == "trainium" and load_hardware("cs3").family == "wafer"
    assert load_hardware("h200").family == "gpu"
    trn2 = load_hardware("trn2")
    assert trn2.chips == 16 and trn2.interconnect is not None and trn2.efficiency.tokens_half == 128
    cs3 = load_hardware("cs3")
    assert cs3.wafer is not None and cs3.wafer.cores == 900_000 and cs3.multi_system is not None
    spec = load_hardware("trn2-spec").decode.speculative
    assert spec is not None and spec.draft_model == "llama-3.2-1b" and spec.tokens_per_step == 7


def test_bad_speculative_and_wafer_sections_are_refused(tmp_path) -> None:
    from core.config import ConfigError
    text = (Path(__file__).resolve().parents[1] / "nodes/profiles/data/hardware/cs3-spec.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("acceptance_rate: 0.9333", "acceptance_rate: 1.5"))
    with pytest.raises(ConfigError) as err:
        load_hardware(bad)
    assert "acceptance_rate" in str(err.value)
    bad.write_text(text.replace("  kv_memory: sram\n", "  kv_memory: external\n"))
    with pytest.raises(ConfigError) as err:
        load_hardware(bad)
    assert "kv_external" in str(err.value)
    bad.write_text(text.replace("  wafer.utilisation: [", "  wafer.speed: ["))
    with pytest.raises(ConfigError) as err:
        load_hardware(bad)
    assert "wafer.speed" in str(err.value)
