"""The roofline cost model: monotonicity, its terms, capacity and fit."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest

from nodes.costmodel import CostModel, StepCost, expected_tokens_per_step
from nodes.profiles import hardware_names, load_hardware, load_model, model_names

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

PAIRS = list(itertools.product(hardware_names(), model_names()))


def cm(hw: str, model: str) -> CostModel:
    return CostModel(load_hardware(hw), load_model(model))


@pytest.mark.parametrize("hw, model", PAIRS)
def test_more_prompt_tokens_is_never_faster(hw: str, model: str) -> None:
    c = cm(hw, model)
    times = [c.prefill([t]).time_s for t in (1, 16, 128, 512, 2048, 8192, 32768)]
    assert all(b >= a for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("hw, model", PAIRS)
def test_a_larger_prefill_batch_is_never_faster(hw: str, model: str) -> None:
    c = cm(hw, model)
    times = [c.prefill([1024] * b).time_s for b in (1, 2, 4, 16)]
    assert all(b >= a for a, b in zip(times, times[1:])), times


@pytest.mark.parametrize("hw, model", PAIRS)
def test_a_larger_decode_batch_or_context_is_never_faster(hw: str, model: str) -> None:
    c = cm(hw, model)
    by_batch = [c.decode_step([2048] * b).time_s for b in (1, 2, 8, 32, 128, 512)]
    assert all(b >= a for a, b in zip(by_batch, by_batch[1:])), by_batch
    by_context = [c.decode_step([ctx] * 8).time_s for ctx in (0, 100, 1000, 10_000, 100_000)]
    assert all(b >= a for a, b in zip(by_context, by_context[1:])), by_context


def test_adding_a_sequence_to_a_decode_batch_is_never_faster() -> None:
    c = cm("h200", "llama-3.1-8b")
    base = [512, 4096, 100]
    assert c.decode_step(base + [1]).time_s >= c.decode_step(base).time_s


def test_step_terms_add_up() -> None:
    for hw, model in [("h200", "llama-3.1-8b"), ("trn2", "llama-3.3-70b"), ("cs3", "llama-3.1-70b"), ("h200x8", "qwen3-32b")]:
        c = cm(hw, model)
        for cost in (c.prefill([3000, 500]), c.decode_step([4096] * 16)):
            assert cost.time_s > 0 and cost.compute_s > 0 and cost.memory_s > 0
            assert cost.overhead_s >= 0 and cost.comm_s >= 0
            roofline = cost.time_s - cost.comm_s - cost.overhead_s
            # the roofline is at least the larger side and at most both sides summed
            assert max(cost.compute_s, cost.memory_s) * 0.5 <= roofline <= cost.compute_s + cost.memory_s + 1e-12
            assert cost.bound in ("compute", "memory", "overhead", "comm")


def test_step_cost_is_a_frozen_dataclass() -> None:
    cost = cm("h200", "llama-3.1-8b").decode_step([100])
    assert isinstance(cost, StepCost) and dataclasses.is_dataclass(cost)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cost.time_s = 0.0  # type: ignore[misc]
    assert {"time_s", "compute_s", "memory_s", "overhead_s", "comm_s", "bound"} <= set(cost.to_dict())


def test_prefill_attention_is_quadratic() -> None:
    m = load_model("llama-3.1-70b")
    c = CostModel(load_hardware("trn2"), m)
    short, long = c.prefill([4096]), c.prefill([32768])
    assert long.flops / short.flops > 8.5  # linear part x8, attention x64
    pairs = 32768 * 32769 / 2
    assert long.flops == pytest.approx(2 * 32768 * m.active_block_params + 2 * m.head_params + m.attn_flops_per_pair * pairs)
    # long prompts are compute-bound on trn2
    assert long.bound == "compute"


def test_chunked_prefill_pays_for_the_cached_context() -> None:
    c = cm("h200", "llama-3.1-8b")
    fresh = c.prefill([2048])
    after = c.prefill([2048], [14336])
    assert after.time_s > fresh.time_s and after.flops > fresh.flops
    # chunks of one prompt cover the same attention pairs as the whole prompt
    whole = c.prefill([8192]).flops
    chunks = sum(c.prefill([2048], [k * 2048]).flops for k in range(4)) - 3 * 2 * load_model("llama-3.1-8b").head_params
    assert chunks == pytest.approx(whole, rel=1e-9)


def test_decode_reads_every_context() -> None:
    m = load_model("llama-3.1-8b")
    c = CostModel(load_hardware("h200"), m)
    a, b = c.decode_step([1000] * 4), c.decode_step([2000] * 4)
    assert b.bytes - a.bytes == pytest.approx(4 * 1000 * m.kv_bytes_per_token)
    assert b.time_s > a.time_s


def test_small_decode_is_memory_or_overhead_bound_and_big_prefill_compute_bound() -> None:
    c = cm("h200", "llama-3.1-70b")
    assert c.decode_step([1024]).bound in ("memory", "overhead")
    assert c.prefill([8192]).bound == "compute"


def test_moe_decode_touches_more_experts_with_a_larger_batch() -> None:
    c = cm("h200x8", "mixtral-8x7b")
    m = load_model("mixtral-8x7b")
    one = c.decode_step([0])
    big = c.decode_step([0] * 64)
    assert one.bytes < m.weight_bytes * 0.5  # top-2 of 8 experts
    assert big.bytes > m.weight_bytes * 0.9  # every expert touched


def test_tensor_parallel_nodes_pay_for_all_reduces() -> None:
    single, node = cm("h200", "llama-3.1-8b"), cm("h200x8", "llama-3.1-8b")
    assert single.decode_step([1000]).comm_s == 0.0
    comm = node.decode_step([1000]).comm_s
    hw = load_hardware("h200x8")
    assert comm >= 2 * 32 * hw.interconnect.latency
    assert node.prefill([8192]).comm_s > comm  # bigger messages
    assert node.prefill([8192]).time_s < single.prefill([8192]).time_s  # 8 GPUs are faster on a long prompt


def test_trn2_holds_405b_with_room_for_kv() -> None:
    c = cm("trn2", "llama-3.1-405b")
    assert c.fits()
    hw = load_hardware("trn2")
    assert c.kv_capacity_bytes() == int(hw.memory_bytes * hw.memory_usable) - load_model("llama-3.1-405b").weight_bytes
    assert c.max_kv_tokens() > 1_000_000


def test_a_model_that_does_not_fit_still_gets_a_time() -> None:
    c = cm("h200", "llama-3.1-70b")  # 141 GB of weights in 141 GB x 90 %
    assert not c.fits()
    assert c.kv_capacity_bytes() == 0 and c.max_kv_tokens() == 0
    assert c.decode_step([1000]).time_s > 0 and c.prefill([1000]).time_s > 0


def test_cs3_spans_systems_by_weight() -> None:
    small, big = cm("cs3", "llama-3.1-8b"), cm("cs3", "llama-3.1-70b")
    assert small.systems() == 1 and big.systems() == 4  # the brief: 70B in 16-bit on four systems
    assert big.kv_capacity_bytes() == 4 * 44_000_000_000 - load_model("llama-3.1-70b").weight_bytes
    assert small.kv_capacity_bytes() == 44_000_000_000 - load_model("llama-3.1-8b").weight_bytes
    assert small.decode_step([100]).comm_s == 0.0
    hw = load_hardware("cs3")
    assert big.decode_step([100]).comm_s >= 3 * hw.multi_system.hop_latency
    assert cm("cs3", "llama-3.1-405b").systems() == math.ceil(load_model("llama-3.1-405b").weight_bytes / 44e9)


def test_kv_bytes() -> None:
    c = cm("trn2", "llama-3.1-70b")
    assert c.kv_bytes(0) == 0
    assert c.kv_bytes(8192) == 8192 * 327680
    with pytest.raises(ValueError):
        c.kv_bytes(-1)


def test_bad_arguments() -> None:
    c = cm("h200", "llama-3.1-8b")
    with pytest.raises(ValueError):
        c.prefill([100, 200], [0])
    with pytest.raises(ValueError):
        c.prefill([-5])
    with pytest.raises(ValueError):
        c.decode_step([-1])
    empty = c.decode_step([])
    assert empty.time_s == 0.0


def test_blocks_only_leaves_out_the_lm_head() -> None:
    hw, m = load_hardware("h200"), load_model("llama-3.1-8b")
    full, blocks = CostModel(hw, m).decode_step([1024]), CostModel(hw, m, include_head=False).decode_step([1024])
    assert full.bytes - blocks.bytes == pytest.approx(m.head_params * 2)


@pytest.mark.parametrize("hw, model", [("trn2", "llama-3.3-70b"), ("trn2", "llama-3.1-8b"), ("h200", "llama-3.1-8b")])
def test_chunked_prefill_costs_the_prompt_plus_chunking_overheads(hw, model):
    """A per-request fixed cost is paid once (in the first chunk), not per step: a 10k prompt in
    four chunks costs what it costs whole plus each extra step's fixed costs (per step, per layer,
    the all-reduces' latencies) and the matmuls' fill of each chunk (n-half), nothing else."""
    hwp = load_hardware(hw)
    cm = CostModel(hwp, load_model(model))
    whole = cm.prefill([10_000]).time_s
    chunks = [cm.prefill([2500], [2500 * i]) for i in range(4)]
    chunked = sum(c.time_s for c in chunks)
    layers = cm.model.layers
    per_step = hwp.prefill.step + layers * hwp.prefill.layer
    if hwp.chips > 1:
        per_step += 2 * layers * hwp.interconnect.latency
    # the fill of N tokens costs the FLOPs of n-half more: per chunk n-half / 2500 of its FLOPs
    fill = hwp.efficiency.tokens_half * (sum(c.flops for c in chunks) / 2500 - cm.prefill([10_000]).flops / 10_000) / (
        hwp.chips * hwp.peak_flops_for("bf16") * min(hwp.efficiency.compute, hwp.efficiency.attention))
    host = hwp.prefill.host_layer > 0  # eager launch work overlaps the device (p-norm): bounded, not additive
    assert whole <= chunked <= whole + 3 * per_step + fill + (0.10 * whole if host else 0.01 * whole)
    request = hwp.prefill.request
    assert chunks[0].time_s - cm.prefill([2500], [1]).time_s == pytest.approx(request, abs=1e-4)
    # a step that starts several prompts pays it once, as a step of one did before chunking
    two = cm.prefill([1000, 1000]).time_s - cm.prefill([1000, 1000], [1, 1]).time_s
    assert two == pytest.approx(request, abs=2e-4)


def test_expected_tokens_per_speculative_step() -> None:
    # Leviathan et al.: (1 - a^(k+1)) / (1 - a); a = 0.8, k = 4: (1 - 0.32768) / 0.2 = 3.3616
    assert expected_tokens_per_step(4, 0.8) == pytest.approx(3.3616)
    assert expected_tokens_per_step(4, 0.0) == 1.0  # nothing accepted: the verification's own token
    assert expected_tokens_per_step(4, 1.0) == 5.0
    assert expected_tokens_per_step(0, 0.5) == 1.0
    with pytest.raises(ValueError):
        expected_tokens_per_step(4, 1.5)
    with pytest.raises(ValueError):
        expected_tokens_per_step(-1, 0.5)


def test_speculative_round_is_draft_steps_plus_one_verification() -> None:
    target = CostModel(load_hardware("cs3"), load_model("llama-3.3-70b"))
    draft = CostModel(load_hardware("cs3"), load_model("llama-3.1-8b"))
    spec = target.speculative_decode_step([1000, 2000], draft, 3, 0.7)
    # fused speculation: the draft steps cost their device time, the round its fixed cost once
    step = load_hardware("cs3").decode.step
    draft_s = sum(draft.decode_step([1000 + i, 2000 + i]).time_s - step for i in range(3))
    assert spec.draft_s == pytest.approx(draft_s)
    assert spec.verify.time_s == pytest.approx(target.prefill([4, 4], [1000, 2000]).time_s - load_hardware("cs3").prefill.step)
    assert spec.overhead_s == step
    assert spec.time_s == pytest.approx(step + draft_s + spec.verify.time_s)
    assert spec.time_per_token_s == pytest.approx(spec.time_s / expected_tokens_per_step(3, 0.7))


def test_speculation_with_a_cheap_draft_speeds_up_a_large_model() -> None:
    # a small draft whose tokens are mostly accepted makes 405B faster per user than plain decode;
    # a draft that is never accepted only adds its own cost
    target = CostModel(load_hardware("cs3"), load_model("llama-3.1-405b"))
    draft = CostModel(load_hardware("cs3"), load_model("llama-3.1-8b"))
    plain = target.decode_step([1000]).time_s
    assert target.speculative_decode_step([1000], draft, 4, 0.8).time_per_token_s < plain
    assert target.speculative_decode_step([1000], draft, 4, 0.0).time_per_token_s > plain


@pytest.mark.parametrize("model, bound", [("llama-3.3-70b", 0.15), ("llama-3.1-405b", 0.15), ("llama-3.1-8b", 0.20)])
def test_chunked_prefill_costs_about_the_unchunked_prompt(model: str, bound: float) -> None:
    """trn2: the per-prompt cost is paid by the first chunk only, so 10k tokens in 2k chunks cost the
    unchunked prefill plus four more steps' all-reduce latencies (2 x layers x 74 us each) and
    chunk fill: +10 % for 70B, +6 % for 405B; 8B's 118 ms prompt pays 4.7 ms per extra chunk (+17 %)."""
    c = cm("trn2", model)
    whole = c.prefill([10240]).time_s
    chunks = sum(c.prefill([2048], [x]).time_s for x in range(0, 10240, 2048))
    assert whole <= chunks <= (1 + bound) * whole
    assert c.prefill([2048], [0]).time_s > c.prefill([2048], [1]).time_s  # only the first chunk starts the prompt


# ---- wafer-scale mechanism (CS-3) ----------------------------------------------------------------

def _layer_time(c: CostModel, contexts: list[int]) -> float:
    """The per-layer time of one micro-batch, read back from the model's own terms."""
    one = c.decode_step(contexts)
    return (one.time_s - c.hw.decode.step - one.comm_s) / c.model.layers


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"])
def test_wafer_micro_batches_overlap_in_the_layer_pipeline(model: str) -> None:
    """A micro-batch more (8 more sequences) adds one layer time, not a traversal of the
    pipeline: micro-batches are in flight in different layers and systems at once."""
    c = cm("cs3", model)
    lanes = c.hw.wafer.lanes
    t_layer = _layer_time(c, [1000] * lanes)
    one, two = c.decode_step([1000] * lanes).time_s, c.decode_step([1000] * (2 * lanes)).time_s
    assert two - one == pytest.approx(t_layer, rel=0.05)
    assert two - one < 0.05 * one  # a traversal is L >= 32 layer times


@pytest.mark.parametrize("model", ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"])
def test_wafer_batch_one_latency_is_the_whole_traversal(model: str) -> None:
    """A single token crosses every layer of every system in turn, and every system link: the
    pipeline does not shorten it (latency does not drop with S; micro-batching only adds throughput)."""
    c = cm("cs3", model)
    s, hw = c.systems(), c.hw
    t_layer = _layer_time(c, [1000])
    t = c.decode_step([1000])
    assert t.comm_s >= (s - 1) * hw.multi_system.hop_latency
    assert t.time_s >= c.model.layers * t_layer + (s - 1) * hw.multi_system.hop_latency + hw.decode.step - 1e-12
    # a batch never lowers the time of a step
    assert c.decode_step([1000] * 8).time_s >= t.time_s


def test_wafer_batched_throughput_scales_with_systems() -> None:
    """70B on wafers of 44, 22 and 11 GB spans 4, 7 and 13 systems; each layer gets S/4 times
    the cores, so the pipeline's batched throughput grows in proportion to S (at a batch large
    enough, 65,536 short sequences, that filling the pipeline and the S - 1 links is negligible)."""
    base = load_hardware("cs3")
    model = load_model("llama-3.1-70b")
    out = {}
    for gb in (44, 22, 11):
        hw = base.model_copy(update={"memory_capacity": gb * 10**9})
        c = CostModel(hw, model)
        out[c.systems()] = 65536 / c.decode_step([100] * 65536).time_s
    (s1, t1), *rest = sorted(out.items())
    for s, t in rest:
        assert t / t1 == pytest.approx(s / s1, rel=0.15)


def test_wafer_batch_and_context_scaling() -> None:
    """Per-user speed falls with the batch only once the pipeline holds more micro-batches than
    layers; a long context costs attention FLOPs and KV reads at every layer."""
    c = cm("cs3", "llama-3.3-70b")
    t1 = c.decode_step([1000]).time_s
    t8 = c.decode_step([1000] * 8).time_s
    t64 = c.decode_step([1000] * 64).time_s
    assert t8 / t1 < 1.2  # one micro-batch of 8: about one token's time
    assert 64 / t64 > 6 * (8 / t8)  # 8 micro-batches in flight: ~8x the throughput of 1
    assert c.decode_step([32_000]).time_s > c.decode_step([1000]).time_s


def test_wafer_kv_capacity_is_sram_left_after_weights_or_external() -> None:
    c = cm("cs3", "llama-3.3-70b")
    assert c.kv_capacity_bytes() == 4 * 44 * 10**9 - c.model.weight_bytes
    assert c.max_kv_tokens() // 10_000 == 10  # ~10 requests of 10k tokens (issue 8)
    hw = c.hw
    ext = hw.model_copy(update={"wafer": hw.wafer.model_copy(update={
        "kv_memory": "external", "kv_external_capacity": 1.5e12, "kv_external_bandwidth": 1e11})})
    e = CostModel(ext, c.model)
    assert e.kv_capacity_bytes() == 4 * 1.5e12
    # KV read from a slow external memory makes long contexts cost more than from SRAM
    assert e.decode_step([8192] * 8).time_s > c.decode_step([8192] * 8).time_s


# ---- Trainium mechanism --------------------------------------------------------------------------

def test_trainium_small_prompts_underuse_the_chips() -> None:
    """Prefill efficiency grows with the tokens of a step (n-half): 128 tokens reach half the
    matmul efficiency of a long prompt, so per-token cost falls with the prompt."""
    c = cm("trn2", "llama-3.3-70b")
    per_token = [(c.prefill([n]).time_s - c.hw.prefill.request) / n for n in (128, 1024, 8192)]
    assert per_token[0] > per_token[1] > per_token[2]
    # a smaller tensor-parallel group has fewer all-reduce ring steps but less compute
    two = CostModel(c.hw.model_copy(update={"chips": 2}), load_model("llama-3.1-8b"))
    sixteen = cm("trn2", "llama-3.1-8b")
    assert two.prefill([8192]).compute_s > sixteen.prefill([8192]).compute_s


def test_trainium_collectives_follow_the_message_size() -> None:
    c = cm("trn2", "llama-3.3-70b")
    link = c.hw.interconnect
    n, layers, hidden = c.hw.chips, c.model.layers, c.model.hidden_size
    for tokens in (1, 512, 8192):
        expect = 2 * layers * (link.latency + 2 * (n - 1) / n * tokens * hidden * 2 / (link.bandwidth * link.efficiency))
        assert c.prefill([tokens]).comm_s == pytest.approx(expect)


def test_trainium_request_cost_is_per_prompt_and_step_cost_per_step() -> None:
    c = cm("trn2", "llama-3.1-8b")
    hw = c.hw
    assert hw.prefill.request > 0 and hw.decode.step > 0
    # a decode step pays the per-step cost, never the per-request one
    assert c.decode_step([100]).overhead_s == pytest.approx(hw.decode.step)


# ---- speculative decoding as a profile option ---------------------------------------------------

@pytest.mark.parametrize("hw, model", [("cs3-spec", "llama-3.3-70b"), ("cs3-spec", "llama-3.1-405b"),
                                       ("trn2-spec", "llama-3.3-70b"), ("trn2-spec", "llama-3.1-405b")])
def test_speculative_profile_speeds_up_per_user_tokens(hw: str, model: str) -> None:
    spec = cm(hw, model)
    plain = cm(hw.removesuffix("-spec"), model)
    s = spec.decode_step([1000])
    assert s.tokens_per_step == pytest.approx(expected_tokens_per_step(7, spec.hw.decode.speculative.acceptance_rate))
    assert 1 / s.time_s > 1.5 / plain.decode_step([1000]).time_s
    # the expected time per token is the round over its expected tokens
    sd = spec.speculative_decode_step([1000], spec.draft, 7, spec.hw.decode.speculative.acceptance_rate)
    assert s.time_s == pytest.approx(sd.time_s / sd.tokens_per_step)
    # the draft also prefills the prompt
    assert spec.prefill([4096]).time_s > plain.prefill([4096]).time_s


def test_speculative_profile_does_not_speculate_for_the_draft_itself() -> None:
    c = cm("cs3-spec", "llama-3.2-1b")
    assert c.speculative is None and c.decode_step([100]).tokens_per_step == 1.0
    assert c.decode_step([100]).time_s == pytest.approx(cm("cs3", "llama-3.2-1b").decode_step([100]).time_s)


def test_a_never_accepted_draft_only_costs() -> None:
    hw = load_hardware("cs3-spec")
    never = hw.model_copy(update={"decode": hw.decode.model_copy(update={
        "speculative": hw.decode.speculative.model_copy(update={"acceptance_rate": 0.0})})})
    c = CostModel(never, load_model("llama-3.1-405b"))
    assert c.decode_step([1000]).time_s > cm("cs3", "llama-3.1-405b").decode_step([1000]).time_s


def test_the_simulator_decodes_by_the_speculative_profile(tmp_path) -> None:
    """A decode pool on ``cs3-spec`` serves Llama-3.3-70B with the expected time per token of a
    speculative round: the simulated TPOT is the plain CS-3 one over the round's speed-up
    (5.2 x at these contexts), as the cost model says."""
    import json
    from pathlib import Path

    import yaml

    from testbed.cli import main

    quick = yaml.safe_load((Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.yaml").read_text())
    tpot = {}
    for hw in ("cs3", "cs3-spec"):
        sc = dict(quick, name=f"spec-{hw}", model="llama-3.3-70b")
        sc["pools"] = {"prefill": {"count": 1}, "decode": {"count": 1, "hardware": hw}}
        sc["slo"] = {"ttft_ms": 5000, "tpot_ms": 10}
        path = tmp_path / f"{hw}.yaml"
        path.write_text(yaml.safe_dump(sc))
        out = tmp_path / hw
        assert main(["run", str(path), "--backend", "sim", "--out", str(out), "--json"]) == 0
        tpot[hw] = json.loads((out / "summary.json").read_text())["tpot_ms"]["p50"]
    model = load_model("llama-3.3-70b")
    ratio = (CostModel(load_hardware("cs3-spec"), model).decode_step([1600]).time_s
             / CostModel(load_hardware("cs3"), model).decode_step([1600]).time_s)
    assert tpot["cs3-spec"] / tpot["cs3"] == pytest.approx(ratio, rel=0.10)


@pytest.mark.parametrize("hw, model", [("cs3", "llama-3.1-8b"), ("cs3", "llama-3.1-405b"), ("trn2", "llama-3.3-70b"),
                                       ("h200", "mixtral-8x7b"), ("h200x8", "deepseek-v3"), ("cs3-spec", "llama-3.1-70b")])
def test_cached_terms_give_the_freshly_computed_costs(hw: str, model: str) -> None:
    """A cost model computes its profile's derived figures once (ModelTerms, systems): after many
    steps of other sizes it answers exactly as a cost model built afresh for each question."""
    hardware, profile = load_hardware(hw), load_model(model)
    warm = CostModel(hardware, profile)
    assert all(getattr(warm.terms, f.name) == getattr(profile, f.name)
               for f in dataclasses.fields(warm.terms) if f.name != "touched_block_params")
    for tokens in (1, 7, 512, 4096):
        assert warm.terms.touched_block_params(tokens) == profile.touched_block_params(tokens)
    questions = [("prefill", ([1024, 512], [0, 256])), ("prefill", ([1], None)), ("decode_step", ([100, 2000, 4000],)),
                 ("decode_step", ([2048] * 64,)), ("plain_decode_step", ([0],))]
    for name, args in questions * 2:  # the second round is answered from warm caches
        assert getattr(warm, name)(*args) == getattr(CostModel(hardware, profile), name)(*args)
    fresh = CostModel(hardware, profile)
    assert (warm.systems(), warm.kv_capacity_bytes(), warm.kv_bytes(1234)) == \
           (fresh.systems(), fresh.kv_capacity_bytes(), fresh.kv_bytes(1234))
