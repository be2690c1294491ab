"""The calibrated roofline cost model: how long a prefill batch or a decode step takes.

Per step, three operator classes are each bounded by compute or by memory traffic (a
roofline per class, as operator-level simulators such as Vidur and LLMCompass do):

- dense matmuls: ``2 x tokens x active weights`` FLOPs (the LM head only for each sequence's
  last position) against the weight bytes the step touches (for MoE, the experts its tokens
  route to, which grow with the batch);
- attention: ``2 x layers x heads x (d_qk + d_v)`` FLOPs per (query, cached token) pair, so
  quadratic in a prompt, against the KV bytes read (every context in decode) and written;
- elementwise work (norms, rotary, activations, residuals): activation bytes per token.

Their sum is the device time. Tensor-parallel nodes split it over their chips and add two
all-reduces per layer; a multi-system pipeline (CS-3) runs its systems one after another and
adds a hop per system boundary. Fixed costs complete it: per step, per started prompt (once, not
per chunk), per layer, and host launch
work that overlaps the device (blended by a p-norm). The efficiencies and overheads come
from the hardware profile, fitted to the reference points of :mod:`nodes.calibration`.
All values are SI: seconds, bytes, FLOP/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

from nodes.profiles.hardware import HardwareProfile, Overheads
from nodes.profiles.models import ModelProfile

Bound = Literal["compute", "memory", "overhead", "comm"]
ACTIVATION_BYTES = 2.0  # activations and all-reduce payloads travel in bf16


@dataclass(frozen=True)
class StepCost:
    """The time of one step and the terms that produced it.

    ``time_s = roofline + comm_s + overhead_s`` where the roofline is the sum over operator
    classes of max(compute, memory); ``compute_s`` and ``memory_s`` are the raw totals of each
    side (not additive with each other). ``bound`` names the largest contributor."""

    time_s: float
    compute_s: float
    memory_s: float
    overhead_s: float
    comm_s: float
    bound: Bound
    flops: float = 0.0
    bytes: float = 0.0

    def to_dict(self) -> dict[str, float | str]:
        return {"time_s": self.time_s, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "overhead_s": self.overhead_s, "comm_s": self.comm_s, "bound": self.bound,
                "flops": self.flops, "bytes": self.bytes}


def expected_tokens_per_step(k: int, acceptance_rate: float) -> float:
    """Expected tokens a speculative round emits per sequence with ``k`` draft tokens, each accepted
    independently with probability ``acceptance_rate`` (Leviathan et al. 2023, eq. 1):
    ``(1 - a^(k+1)) / (1 - a)``; the verification always yields one token of its own."""
    if k < 0:
        raise ValueError("tokens_per_step must be >= 0")
    a = float(acceptance_rate)
    if not 0.0 <= a <= 1.0:
        raise ValueError("acceptance_rate must be within [0, 1]")
    if a == 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True)
class SpeculativeStep:
    """One speculative decoding round: the draft's k steps, then one verification step."""

    draft_s: float
    verify: StepCost
    tokens_per_step: float  # expected tokens emitted per sequence in the round

    @property
    def time_s(self) -> float:
        return self.draft_s + self.verify.time_s

    @property
    def time_per_token_s(self) -> float:
        """Expected time per emitted token of one sequence (the inter-token latency)."""
        return self.time_s / self.tokens_per_step


class CostModel:
    """Step times of ``model`` on one node of ``hardware``.

    ``include_head=False`` models the transformer blocks alone (no embedding or LM head), as
    some microbenchmarks measure them."""

    def __init__(self, hardware: HardwareProfile, model: ModelProfile, *, include_head: bool = True):
        self.hw = hardware
        self.model = model
        self.include_head = include_head
        self._peak = hardware.peak_flops_for(model.dtype)

    # ---- capacity ---------------------------------------------------------------------------

    def kv_bytes(self, tokens: int) -> int:
        """Model bytes of the KV cache of ``tokens`` tokens (unscaled by byte scale)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        return int(tokens) * self.model.kv_bytes_per_token

    def systems(self) -> int:
        """Systems the model spans: 1, or for a multi-system profile as many as its weights need."""
        if self.hw.multi_system is None:
            return 1
        per_system = self.hw.memory_bytes * self.hw.memory_usable
        return max(1, math.ceil(self.model.weight_bytes / per_system))

    def memory_capacity_bytes(self) -> int:
        """Usable memory for weights and KV across the chips (and systems) the model occupies."""
        return int(self.hw.memory_bytes * self.hw.memory_usable * self.systems())

    def fits(self) -> bool:
        """Whether the weights fit, leaving some room for KV."""
        if self.hw.multi_system is not None and self.systems() > self.hw.multi_system.max_systems:
            return False
        return self.model.weight_bytes < self.memory_capacity_bytes()

    def kv_capacity_bytes(self) -> int:
        """KV room after the weights (0 when the model does not fit)."""
        if not self.fits():
            return 0
        return self.memory_capacity_bytes() - self.model.weight_bytes

    def max_kv_tokens(self) -> int:
        return self.kv_capacity_bytes() // self.model.kv_bytes_per_token

    # ---- steps ----------------------------------------------------------------------------

    def prefill(self, prompt_tokens: Sequence[int], context_tokens: Sequence[int] | None = None) -> StepCost:
        """One prefill step over a batch of prompts; with chunked prefill ``context_tokens[i]``
        tokens of sequence i are already cached and ``prompt_tokens[i]`` is the chunk."""
        new = [int(n) for n in prompt_tokens]
        cached = [0] * len(new) if context_tokens is None else [int(c) for c in context_tokens]
        if len(cached) != len(new):
            raise ValueError("context_tokens must have one entry per prompt")
        if any(n < 0 for n in new) or any(c < 0 for c in cached):
            raise ValueError("token counts must be >= 0")
        pairs = [(n, c) for n, c in zip(new, cached) if n > 0]
        return self._step(pairs, self.hw.prefill, starts=any(c == 0 for _, c in pairs))

    def decode_step(self, context_lens: Sequence[int]) -> StepCost:
        """One decode step: each sequence emits one token attending over its context."""
        contexts = [int(c) for c in context_lens]
        if any(c < 0 for c in contexts):
            raise ValueError("context lengths must be >= 0")
        return self._step([(1, c) for c in contexts], self.hw.decode)

    def speculative_decode_step(self, context_lens: Sequence[int], draft: "CostModel",
                                tokens_per_step: int, acceptance_rate: float) -> SpeculativeStep:
        """One speculative decoding round: ``draft`` proposes ``tokens_per_step`` (k) tokens per
        sequence one decode step at a time, then this model verifies them in one step over k + 1
        positions (the last accepted token and the k drafts), as a chunked prefill of k + 1 tokens
        per sequence against its context. The draft runs on the same node, before the verification."""
        contexts = [int(c) for c in context_lens]
        if any(c < 0 for c in contexts):
            raise ValueError("context lengths must be >= 0")
        k = int(tokens_per_step)
        draft_s = sum(draft.decode_step([c + i for c in contexts]).time_s for i in range(k))
        verify = self._step([(k + 1, c) for c in contexts], self.hw.decode)
        return SpeculativeStep(draft_s=draft_s, verify=verify,
                               tokens_per_step=expected_tokens_per_step(k, acceptance_rate))

    def _step(self, seqs: list[tuple[int, int]], over: Overheads, *, starts: bool = False) -> StepCost:
        if not seqs:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, "overhead")
        m, hw = self.model, self.hw
        tokens = sum(n for n, _ in seqs)
        wbytes = m.weight_dtype_bytes
        kvb = m.kv_bytes_per_token
        head = m.head_params if self.include_head else 0

        # dense matmuls: every token through the active block weights; logits for the last position
        lin_flops = 2.0 * tokens * m.active_block_params + 2.0 * len(seqs) * head
        lin_bytes = (m.touched_block_params(tokens) + head) * wbytes
        # attention: query i of a chunk of n after c cached tokens sees c + i keys (causal)
        pairs = sum(n * c + n * (n + 1) / 2 for n, c in seqs)
        att_flops = m.attn_flops_per_pair * pairs
        att_bytes = sum(c + n for n, c in seqs) * kvb + tokens * kvb  # read the context, write the new KV
        # elementwise traffic
        act_bytes = hw.efficiency.activation_traffic * tokens * m.layers * (m.hidden_size + m.active_mlp_width) * ACTIVATION_BYTES

        # a tensor-parallel node splits the work over its chips; pipelined systems run in turn
        peak = self._peak * hw.chips
        bw = hw.memory_bandwidth * hw.chips
        eff = hw.efficiency
        lin_c, lin_m = lin_flops / (peak * eff.compute), lin_bytes / (bw * eff.memory)
        att_c, att_m = att_flops / (peak * eff.attention), att_bytes / (bw * eff.memory)
        act_m = act_bytes / (bw * eff.memory)
        roofline = max(lin_c, lin_m) + max(att_c, att_m) + act_m
        compute_bound = (lin_c if lin_c >= lin_m else 0.0) + (att_c if att_c >= att_m else 0.0)
        memory_bound = roofline - compute_bound

        comm = self._comm(tokens)
        device = roofline + comm + m.layers * over.layer
        host = m.layers * over.host_layer
        if host > 0:
            p = over.host_overlap
            device = device * (1.0 + (host / device) ** p) ** (1.0 / p) if device > 0 else host
        time = device + over.step + (over.request if starts else 0.0)
        overhead = time - roofline - comm
        terms = {"compute": compute_bound, "memory": memory_bound, "overhead": overhead, "comm": comm}
        bound: Bound = max(terms, key=terms.__getitem__)  # type: ignore[assignment]
        return StepCost(time_s=time, compute_s=lin_c + att_c, memory_s=lin_m + att_m + act_m,
                        overhead_s=overhead, comm_s=comm, bound=bound,
                        flops=lin_flops + att_flops, bytes=lin_bytes + att_bytes + act_bytes)

    def _comm(self, tokens: int) -> float:
        """Tensor-parallel all-reduces (two per layer, ring) or pipeline hops between systems."""
        m, hw = self.model, self.hw
        payload = tokens * m.hidden_size * ACTIVATION_BYTES
        if hw.multi_system is not None:
            hops = self.systems() - 1
            return hops * (hw.multi_system.hop_latency + payload * 8.0 / hw.multi_system.hop_bandwidth)
        if hw.chips > 1 and hw.interconnect is not None:
            n = hw.chips
            ring = 2.0 * (n - 1) / n * payload / hw.interconnect.bandwidth
            return 2 * m.layers * (hw.interconnect.latency + ring)
        return 0.0
