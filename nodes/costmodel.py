"""The cost model: how long a prefill batch or a decode step takes, one mechanism per family.

A step is a list of sequences, each with ``n`` new tokens after ``c`` cached ones (decode:
``n = 1``; prefill: the prompt or a chunk of it). The hardware profile's ``family`` picks the
mechanism (docs/cost-model.md gives the equations and the sources of every constant):

- ``gpu``: a per-operator roofline, as operator-level simulators (Vidur, LLMCompass) use. Dense
  matmuls (``2 x tokens x active weights`` FLOPs against the weight bytes the step touches),
  attention (``2 x layers x heads x (d_qk + d_v)`` FLOPs per (query, cached token) pair against
  the KV bytes) and elementwise traffic are each bounded by compute or memory; a tensor-parallel
  node splits them over its chips and adds two ring all-reduces per layer of the step's
  activations. Fixed costs per step, per layer and host launch work (blended by a p-norm).
- ``trainium``: the same roofline over the instance's NeuronCores, with what differs on a
  Neuron serving stack: matmul efficiency that grows with the tokens of a step (Hockney's
  n-half: a short prompt underuses 16 chips), all-reduces over NeuronLink sized by the step's
  messages, a per-request cost (runtime setup, first-token sampling) paid once per prompt and
  not per chunk, and a per-step cost (scheduler, sampling, launch).
- ``wafer``: weights resident in SRAM, the layers laid out over the wafer's cores and tokens
  streaming through them as a pipeline. A layer's time is its FLOPs at the utilisation a
  matrix-vector product reaches on the cores that hold it, plus the fabric hops across its
  region; a step's micro-batches fill the pipeline, so a batch costs
  ``(layers + micro-batches - 1)`` layer times; a model larger than one wafer spans S systems
  as pipeline stages joined by their I/O links (a hop's latency and bandwidth per crossing).

Speculative decoding (``decode.speculative`` of a profile, or :meth:`CostModel.speculative_decode_step`)
is modelled for every family: the draft's k steps, one verification over k + 1 positions, the
round's fixed cost once, and the expected tokens a round emits.
All values are SI: seconds, bytes, FLOP/s.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Literal, Sequence

from nodes.profiles.hardware import HardwareProfile, Overheads, Speculative
from nodes.profiles.models import ModelProfile

Bound = Literal["compute", "memory", "overhead", "comm"]
ACTIVATION_BYTES = 2.0  # activations and all-reduce payloads travel in bf16


@dataclass(frozen=True)
class StepCost:
    """The time of one step and the terms that produced it.

    ``time_s = roofline + comm_s + overhead_s`` where the roofline is the sum over operator
    classes of max(compute, memory) (for the wafer: the pipeline's layer times); ``compute_s``
    and ``memory_s`` are the raw totals of each side (not additive with each other). ``bound``
    names the largest contributor. ``tokens_per_step`` is the expected tokens each sequence
    gains (1, or more with speculative decoding, where ``time_s`` is the expected time per token)."""

    time_s: float
    compute_s: float
    memory_s: float
    overhead_s: float
    comm_s: float
    bound: Bound
    flops: float = 0.0
    bytes: float = 0.0
    tokens_per_step: float = 1.0

    def to_dict(self) -> dict[str, float | str]:
        return {"time_s": self.time_s, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "overhead_s": self.overhead_s, "comm_s": self.comm_s, "bound": self.bound,
                "flops": self.flops, "bytes": self.bytes, "tokens_per_step": self.tokens_per_step}


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
    """One speculative decoding round: the draft's k steps, then one verification step.

    ``overhead_s`` is the round's fixed cost (host I/O, scheduler, sampling), paid once: the
    draft tokens feed the verification on the device (fused speculation), so the draft steps
    cost their device time only and ``verify`` excludes the fixed cost."""

    draft_s: float
    verify: StepCost
    tokens_per_step: float  # expected tokens emitted per sequence in the round
    overhead_s: float = 0.0

    @property
    def time_s(self) -> float:
        return self.overhead_s + self.draft_s + self.verify.time_s

    @property
    def time_per_token_s(self) -> float:
        """Expected time per emitted token of one sequence (the inter-token latency)."""
        return self.time_s / self.tokens_per_step

    def per_token(self) -> StepCost:
        """The round as the expected cost of one token per sequence (what the daemons step by)."""
        e = self.tokens_per_step
        v = self.verify
        return replace(v, time_s=self.time_per_token_s, compute_s=v.compute_s / e, memory_s=v.memory_s / e,
                       overhead_s=(self.overhead_s + self.draft_s + v.overhead_s) / e, comm_s=v.comm_s / e,
                       flops=v.flops / e, bytes=v.bytes / e, tokens_per_step=e)


@dataclass(frozen=True)
class ModelTerms:
    """The model profile's derived figures that a step reads, computed once per cost model.

    Each is a property that sums over the architecture again on every access, and a simulated
    run asks for them on every decode step; the values are the profile's, unchanged.
    ``touched_block_params`` is the profile's method, memoised by token count."""

    layers: int
    hidden_size: int
    active_block_params: int
    head_params: int
    active_mlp_width: int
    attn_flops_per_pair: int
    kv_bytes_per_token: int
    weight_dtype_bytes: float
    weight_bytes: int
    touched_block_params: Callable[[int], float]

    @classmethod
    def of(cls, model: ModelProfile) -> "ModelTerms":
        values = {f.name: getattr(model, f.name) for f in fields(cls) if f.name != "touched_block_params"}
        return cls(**values, touched_block_params=functools.cache(model.touched_block_params))


class CostModel:
    """Step times of ``model`` on one node of ``hardware``.

    ``include_head=False`` models the transformer blocks alone (no embedding or LM head), as
    some microbenchmarks measure them. With ``decode.speculative`` in the profile (and a draft
    smaller than the served model), :meth:`decode_step` is the expected cost per token of a
    speculative round and :meth:`prefill` also prefills the draft."""

    def __init__(self, hardware: HardwareProfile, model: ModelProfile, *, include_head: bool = True):
        self.hw = hardware
        self.model = model
        self.terms = ModelTerms.of(model)
        self.include_head = include_head
        self._peak = hardware.peak_flops_for(model.compute_dtype or model.dtype)
        self.speculative: Speculative | None = None
        self.draft: CostModel | None = None
        spec = hardware.decode.speculative
        if spec is not None:
            from nodes.profiles import load_model  # deferred: profiles import nothing from here
            draft_model = load_model(spec.draft_model)
            if draft_model.total_params < model.total_params:  # no speculation for the draft itself
                plain = hardware.model_copy(update={"decode": hardware.decode.model_copy(update={"speculative": None})})
                self.draft = CostModel(plain, draft_model, include_head=include_head)
                self.speculative = spec
        self._systems = self._count_systems()

    # ---- capacity ---------------------------------------------------------------------------

    def kv_bytes(self, tokens: int) -> int:
        """Model bytes of the KV cache of ``tokens`` tokens (unscaled by byte scale)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        return int(tokens) * self.terms.kv_bytes_per_token

    def systems(self) -> int:
        """Systems the model spans: 1, or for a multi-system profile as many as its weights need."""
        return self._systems

    def _count_systems(self) -> int:
        if self.hw.multi_system is None:
            return 1
        per_system = self.hw.memory_bytes * self.hw.memory_usable
        return max(1, math.ceil(self.terms.weight_bytes / per_system))

    def memory_capacity_bytes(self) -> int:
        """Usable memory for weights and KV across the chips (and systems) the model occupies."""
        return int(self.hw.memory_bytes * self.hw.memory_usable * self.systems())

    def fits(self) -> bool:
        """Whether the weights fit, leaving some room for KV."""
        if self.hw.multi_system is not None and self.systems() > self.hw.multi_system.max_systems:
            return False
        return self.terms.weight_bytes < self.memory_capacity_bytes()

    def kv_capacity_bytes(self) -> int:
        """KV room: the memory left after the weights (0 when the model does not fit), or a
        wafer's external KV memory."""
        if not self.fits():
            return 0
        wafer = self.hw.wafer
        if wafer is not None and wafer.kv_memory == "external":
            return int(wafer.kv_external_capacity * self.systems())
        return self.memory_capacity_bytes() - self.terms.weight_bytes

    def max_kv_tokens(self) -> int:
        return self.kv_capacity_bytes() // self.terms.kv_bytes_per_token

    # ---- steps ----------------------------------------------------------------------------

    def prefill(self, prompt_tokens: Sequence[int], context_tokens: Sequence[int] | None = None) -> StepCost:
        """One prefill step over a batch of prompts; with chunked prefill ``context_tokens[i]``
        tokens of sequence i are already cached and ``prompt_tokens[i]`` is the chunk. With
        speculative decoding the draft prefills the same tokens (device time, no fixed costs)."""
        new = [int(n) for n in prompt_tokens]
        cached = [0] * len(new) if context_tokens is None else [int(c) for c in context_tokens]
        if len(cached) != len(new):
            raise ValueError("context_tokens must have one entry per prompt")
        if any(n < 0 for n in new) or any(c < 0 for c in cached):
            raise ValueError("token counts must be >= 0")
        pairs = [(n, c) for n, c in zip(new, cached) if n > 0]
        cost = self._step(pairs, self.hw.prefill, starts=any(c == 0 for _, c in pairs), prefill=True)
        if self.draft is not None and pairs:
            draft_s = self.draft._step(pairs, Overheads(), prefill=True).time_s
            cost = replace(cost, time_s=cost.time_s + draft_s, overhead_s=cost.overhead_s + draft_s)
        return cost

    def decode_step(self, context_lens: Sequence[int]) -> StepCost:
        """One decode step: each sequence gains one token attending over its context. With
        speculative decoding in the profile: the expected cost per token of a speculative round
        (``tokens_per_step`` says how many tokens a round yields on average)."""
        contexts = [int(c) for c in context_lens]
        if any(c < 0 for c in contexts):
            raise ValueError("context lengths must be >= 0")
        if self.speculative is not None and self.draft is not None and contexts:
            s = self.speculative
            return self.speculative_decode_step(contexts, self.draft, s.tokens_per_step, s.acceptance_rate).per_token()
        return self.plain_decode_step(contexts)

    def plain_decode_step(self, context_lens: Sequence[int]) -> StepCost:
        """One decode step without speculation."""
        contexts = [int(c) for c in context_lens]
        if any(c < 0 for c in contexts):
            raise ValueError("context lengths must be >= 0")
        return self._step([(1, c) for c in contexts], self.hw.decode)

    def speculative_decode_step(self, context_lens: Sequence[int], draft: "CostModel",
                                tokens_per_step: int, acceptance_rate: float) -> SpeculativeStep:
        """One speculative decoding round: ``draft`` proposes ``tokens_per_step`` (k) tokens per
        sequence one decode step at a time, then this model verifies them in one step over k + 1
        positions (the last accepted token and the k drafts), as a chunked prefill of k + 1 tokens
        per sequence against its context. The round pays the decode step's fixed cost once."""
        contexts = [int(c) for c in context_lens]
        if any(c < 0 for c in contexts):
            raise ValueError("context lengths must be >= 0")
        k = int(tokens_per_step)
        no_fixed = Overheads()
        draft_s = sum(draft._step([(1, c + i) for c in contexts], no_fixed).time_s for i in range(k))
        over = self.hw.decode
        verify = self._step([(k + 1, c) for c in contexts], over.model_copy(update={"step": 0.0}))
        return SpeculativeStep(draft_s=draft_s, verify=verify, overhead_s=over.step,
                               tokens_per_step=expected_tokens_per_step(k, acceptance_rate))

    def _step(self, seqs: list[tuple[int, int]], over: Overheads, *, starts: bool = False,
              prefill: bool = False) -> StepCost:
        if not seqs:
            return StepCost(0.0, 0.0, 0.0, 0.0, 0.0, "overhead")
        if self.hw.family == "wafer":
            return self._wafer_step(seqs, over, starts)
        return self._roofline_step(seqs, over, starts, prefill)

    # ---- GPU and Trainium: a roofline per operator class over tensor-parallel chips -----------

    def _roofline_step(self, seqs: list[tuple[int, int]], over: Overheads, starts: bool, prefill: bool) -> StepCost:
        m, hw = self.terms, self.hw
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
        eff = hw.efficiency
        act_bytes = eff.activation_traffic * tokens * m.layers * (m.hidden_size + m.active_mlp_width) * ACTIVATION_BYTES

        # a tensor-parallel node splits the work over its chips. A prefill streams its tokens
        # through the matmul units (a systolic array fills and drains: efficiency N / (N + n-half));
        # decode kernels stream the weights past the few tokens instead, and are memory-bound
        peak = self._peak * hw.chips
        bw = hw.memory_bandwidth * hw.chips
        fill = tokens / (tokens + eff.tokens_half) if prefill else 1.0
        lin_c, lin_m = lin_flops / (peak * eff.compute * fill), lin_bytes / (bw * eff.memory)
        att_c, att_m = att_flops / (peak * eff.attention * fill), att_bytes / (bw * eff.memory)
        act_m = act_bytes / (bw * eff.memory)
        roofline = max(lin_c, lin_m) + max(att_c, att_m) + act_m
        compute_bound = (lin_c if lin_c >= lin_m else 0.0) + (att_c if att_c >= att_m else 0.0)
        memory_bound = roofline - compute_bound

        comm = self._all_reduce_s(tokens)
        device = roofline + comm + m.layers * over.layer
        host = m.layers * over.host_layer
        if host > 0:
            p = over.host_overlap
            device = device * (1.0 + (host / device) ** p) ** (1.0 / p) if device > 0 else host
        time = device + over.step + (over.request if starts else 0.0)
        return _cost(time, roofline, comm, compute_bound, memory_bound, lin_c + att_c, lin_m + att_m + act_m,
                     lin_flops + att_flops, lin_bytes + att_bytes + act_bytes)

    def _all_reduce_s(self, tokens: int) -> float:
        """Two ring all-reduces per layer of the step's activations (``tokens x hidden x 2 B``)
        over the node's scale-up links (NVLink, NeuronLink)."""
        m, hw = self.terms, self.hw
        if hw.chips <= 1 or hw.interconnect is None:
            return 0.0
        n = hw.chips
        payload = tokens * m.hidden_size * ACTIVATION_BYTES
        link = hw.interconnect
        ring = 2.0 * (n - 1) / n * payload / (link.bandwidth * link.efficiency)
        return 2 * m.layers * (link.latency + ring)

    # ---- wafer-scale: the layer pipeline ------------------------------------------------------

    def _wafer_step(self, seqs: list[tuple[int, int]], over: Overheads, starts: bool) -> StepCost:
        """A step as micro-batches streaming through the model's layers laid out on S wafers.

        A layer holds ``P_layer`` weights on ``cores x P_layer / P_system`` cores, each running
        at ``peak / cores x utilisation``; a micro-batch of b <= lanes tokens reuses each weight
        read, so a layer's time is ``2 x P_system / (peak x utilisation)`` whatever b (plus its
        attention and the hops across its region). B tokens make ``ceil(B / lanes)``
        micro-batches; the pipeline of L layers takes ``(L + micro-batches - 1)`` layer times,
        and a micro-batch crosses S - 1 system links (latency + its activations over the link)."""
        m, hw = self.terms, self.hw
        wafer, ms = hw.wafer, hw.multi_system
        assert wafer is not None
        s = self.systems()
        layers = m.layers
        layers_per_system = layers / s
        tokens = sum(n for n, _ in seqs)
        head = m.head_params if self.include_head else 0
        b = min(tokens, wafer.lanes)
        micro = math.ceil(tokens / b)
        u = self._peak * wafer.utilisation  # FLOP/s of one wafer on a matrix-vector product

        # per layer and micro-batch: its matmuls on its share of the wafer (the LM head counted
        # as part of the last layer's weights, spread over the layers here), its attention, its
        # KV read (SRAM of its region, or the external KV memory), and the hops across its region
        params_per_system = (m.active_block_params + head) / s
        lin_flops = 2.0 * tokens * m.active_block_params + 2.0 * len(seqs) * head
        pairs = sum(n * c + n * (n + 1) / 2 for n, c in seqs)
        att_flops = m.attn_flops_per_pair * pairs
        kv_read = sum(c + n for n, c in seqs) * m.kv_bytes_per_token
        layer_lin = 2.0 * params_per_system / u
        layer_att = att_flops / layers / micro / (u / layers_per_system)  # distinct KV per sequence: no reuse
        if wafer.kv_memory == "external":
            layer_kv = kv_read / layers / micro / float(wafer.kv_external_bandwidth)
        else:
            layer_kv = kv_read / layers / micro / (hw.memory_bandwidth * hw.efficiency.memory / layers_per_system)
        layer_hops = 2.0 * math.sqrt(wafer.cores / layers_per_system) * wafer.fabric_hop
        layer_s = layer_lin + max(layer_att, layer_kv) + layer_hops
        stages = layers + micro - 1
        pipeline = stages * layer_s
        comm = 0.0
        if ms is not None and s > 1:
            comm = (s - 1) * (ms.hop_latency + b * m.hidden_size * ACTIVATION_BYTES * 8.0 / ms.hop_bandwidth)
        device = pipeline + comm + layers * over.layer
        time = device + over.step + (over.request if starts else 0.0)
        compute_s = stages * (layer_lin + layer_att + layer_hops)  # the fabric traversal is part of a layer's compute
        memory_s = stages * layer_kv
        compute_bound = stages * (layer_lin + (layer_att if layer_att >= layer_kv else 0.0) + layer_hops)
        memory_bound = pipeline - compute_bound
        return _cost(time, pipeline, comm, compute_bound, memory_bound, compute_s, memory_s,
                     lin_flops + att_flops, kv_read + tokens * m.kv_bytes_per_token)


def _cost(time: float, roofline: float, comm: float, compute_bound: float, memory_bound: float,
          compute_s: float, memory_s: float, flops: float, nbytes: float) -> StepCost:
    overhead = time - roofline - comm
    terms = {"compute": compute_bound, "memory": memory_bound, "overhead": overhead, "comm": comm}
    bound: Bound = max(terms, key=terms.__getitem__)  # type: ignore[assignment]
    return StepCost(time_s=time, compute_s=compute_s, memory_s=memory_s, overhead_s=overhead, comm_s=comm,
                    bound=bound, flops=flops, bytes=nbytes)
