"""Hardware profiles: one serving node (an instance, a GPU, an 8-GPU node, a CS-3 system).

A profile has two kinds of numbers. Published ones (peak FLOPs, memory size and bandwidth,
interconnect, EFA) each name their source in ``sources``. Calibrated ones (``efficiency``,
``prefill``/``decode`` overheads) are fitted so the cost model reproduces the reference
points of ``pdtb profiles validate``; their ``sources`` entry says what they were fitted to.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from core.config import StrictModel
from core.units import Bandwidth, ByteRate, ByteSize, Duration, FlopRate, Ratio

from nodes.profiles.models import ProfileName

# keys whose value is a published figure: each must name its source
PUBLISHED_KEYS: tuple[str, ...] = ("peak_flops", "memory_capacity", "memory_bandwidth", "efa_bandwidth", "efa_nics")
CALIBRATED_KEYS: tuple[str, ...] = ("efficiency", "prefill", "decode")
Family = Literal["gpu", "trainium", "wafer"]


class Interconnect(StrictModel):
    """The scale-up link between the chips of a node, used for tensor-parallel all-reduces."""

    bandwidth: ByteRate = Field(gt=0)  # per chip, one direction
    latency: Duration = Field(ge=0)  # fixed cost of one all-reduce (launch)
    efficiency: Ratio = Field(default=1.0, gt=0)  # share of ``bandwidth`` a serving all-reduce reaches


class MultiSystem(StrictModel):
    """A model larger than one system's memory is split by layers across several systems
    (a pipeline); each step crosses ``systems - 1`` hops."""

    max_systems: int = Field(gt=1)
    hop_latency: Duration = Field(ge=0)
    hop_bandwidth: Bandwidth = Field(gt=0)


class Efficiency(StrictModel):
    """Fractions of the peaks that serving kernels reach (fitted).

    ``tokens_half`` (Hockney's n-half): the tokens per step at which the matmuls reach half of
    ``compute``; the efficiency of a step of N tokens is ``compute x N / (N + tokens_half)``, so a
    short prompt underuses the chips and a chunk of a long one pays a little (0 = always ``compute``)."""

    compute: Ratio = Field(gt=0)  # dense matmuls (MFU)
    attention: Ratio = Field(gt=0)  # attention score/value FLOPs (flash-style kernels)
    memory: Ratio = Field(gt=0)  # streaming weights, KV and activations (MBU)
    activation_traffic: float = Field(default=0.0, ge=0)  # elementwise bytes per token per layer, in units of (hidden + MLP width) x 2 B
    tokens_half: float = Field(default=0.0, ge=0)


class Speculative(StrictModel):
    """Speculative decoding on a decode node: ``draft_model`` proposes ``tokens_per_step`` (k)
    tokens per sequence, the served model verifies them in one step; each draft token is
    accepted with probability ``acceptance_rate`` (a property of draft, target and workload)."""

    draft_model: ProfileName
    tokens_per_step: int = Field(gt=0, le=64)
    acceptance_rate: Ratio = Field(ge=0, le=1)


class Wafer(StrictModel):
    """A wafer-scale engine: weights resident in the cores' SRAM, the model's layers laid out
    over the cores (each layer on a region proportional to its weights), tokens streaming
    through the layers as a pipeline.

    ``utilisation``: share of ``peak_flops`` a core reaches on a matrix-vector product (one
    token per weight read); a weight read feeds up to ``lanes`` tokens of a micro-batch, so a
    micro-batch of b <= lanes tokens takes the time of one. ``fabric_hop``: one core-to-core
    hop of the on-wafer mesh; crossing a layer's region costs twice its side in hops.
    ``kv_memory``: where the KV cache lives, the SRAM left after the weights or an external
    memory of ``kv_external_capacity`` per system read at ``kv_external_bandwidth``."""

    cores: int = Field(gt=0)
    utilisation: Ratio = Field(gt=0)
    lanes: int = Field(gt=0)
    fabric_hop: Duration = Field(ge=0)
    kv_memory: Literal["sram", "external"] = "sram"
    kv_external_capacity: ByteSize | None = None
    kv_external_bandwidth: ByteRate | None = None

    @model_validator(mode="after")
    def _external(self) -> "Wafer":
        if self.kv_memory == "external" and (self.kv_external_capacity is None or self.kv_external_bandwidth is None):
            raise ValueError("kv_memory: external needs kv_external_capacity and kv_external_bandwidth")
        return self


class Overheads(StrictModel):
    """Fixed costs of one step, beside the roofline terms.

    ``step`` and ``layer`` add to the device time (scheduler, sampling, kernel latencies);
    ``host_layer`` is host launch work per layer that runs concurrently with the device
    (eager frameworks), blended with the device time by ``host_overlap``: the p of a p-norm,
    1 = no overlap (they add), large = full overlap (the larger wins). ``request`` is paid once
    by a step that starts a prompt (a sequence with nothing cached: runtime setup of a new
    prefill, first-token sampling), however many start in it, so the later chunks of a chunked
    prefill do not repeat it."""

    step: Duration = 0.0
    request: Duration = 0.0
    layer: Duration = 0.0
    host_layer: Duration = 0.0
    host_overlap: float = Field(default=3.0, ge=1.0)


class DecodeOverheads(Overheads):
    """A decode node's fixed costs, and optionally speculative decoding (see :class:`Speculative`)."""

    speculative: Speculative | None = None


class HardwareProfile(StrictModel):
    """One serving node (YAML ``kind: hardware``). Per-chip figures; ``chips`` per node."""

    KIND: ClassVar[str] = "hardware"

    name: ProfileName
    description: str = ""
    family: Family = "gpu"  # which of the cost model's mechanisms: roofline (gpu, trainium) or wafer pipeline
    chips: int = Field(default=1, gt=0)  # accelerators in the node, sharing the model by tensor parallelism
    peak_flops: dict[Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"], FlopRate]
    memory_kind: Literal["hbm", "sram"] = "hbm"
    memory_capacity: ByteSize = Field(gt=0)  # per chip: where weights and KV live
    memory_bandwidth: ByteRate = Field(gt=0)  # per chip
    memory_usable: Ratio = Field(default=1.0, gt=0)  # share of memory_capacity for weights + KV
    sram: ByteSize | None = None  # on-chip SRAM per chip, where it is not the main memory (informative)
    interconnect: Interconnect | None = None
    multi_system: MultiSystem | None = None
    wafer: Wafer | None = None
    efa_bandwidth: Bandwidth = Field(gt=0)  # per node
    efa_nics: int = Field(gt=0)
    efficiency: Efficiency
    prefill: Overheads = Overheads()
    decode: DecodeOverheads = DecodeOverheads()
    sources: dict[str, str]
    # constant key path (``efficiency.compute``) -> ids of the reference points it was fitted to
    # (nodes/profiles/data/calibration/published_points.csv); every other number is in ``sources``
    fitted: dict[str, list[str]] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "HardwareProfile":
        if "bf16" not in self.peak_flops:
            raise ValueError("peak_flops must state bf16 (the default serving dtype)")
        if self.chips > 1 and self.interconnect is None:
            raise ValueError(f"a node of {self.chips} chips needs 'interconnect' for its tensor-parallel all-reduces")
        if self.multi_system is not None and self.chips != 1:
            raise ValueError("multi_system describes a pipeline of single-chip systems: chips must be 1")
        if (self.family == "wafer") != (self.wafer is not None):
            raise ValueError("family: wafer and a 'wafer' section go together")
        for key in self.fitted:
            if not _has_path(self, key):
                raise ValueError(f"fitted names a constant that does not exist: {key}")
        unknown = sorted(k for k in self.sources if not _has_path(self, k))
        if unknown:
            raise ValueError(f"sources name keys that do not exist: {', '.join(unknown)}")
        needed = list(PUBLISHED_KEYS) + list(CALIBRATED_KEYS)
        needed += [k for k in ("interconnect", "multi_system", "sram", "wafer") if getattr(self, k) is not None]
        if self.decode.speculative is not None:
            needed.append("decode.speculative")
        missing = [k for k in needed if k not in self.sources and k.split(".")[0] not in self.sources
                   and not any(s.startswith(k + ".") for s in self.sources)]
        if missing:
            raise ValueError(f"sources must name where each number comes from; missing: {', '.join(missing)}")
        return self

    @property
    def efa_bandwidth_bps(self) -> float:
        """EFA bandwidth of the node, bit/s."""
        return float(self.efa_bandwidth)

    @property
    def memory_bytes(self) -> int:
        """Memory of one node (all its chips; one system for a multi-system profile)."""
        return int(self.memory_capacity * self.chips)

    def peak_flops_for(self, dtype: str) -> float:
        """Peak dense FLOP/s of one chip for ``dtype``, falling back to bf16 when not stated."""
        return float(self.peak_flops.get(dtype, self.peak_flops["bf16"]))


def _has_path(profile: StrictModel, key: str) -> bool:
    """Whether ``key`` (``decode.speculative.acceptance_rate``) names a field of ``profile``."""
    node: object = profile
    for part in key.split("."):
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif isinstance(node, StrictModel) and part in type(node).model_fields:
            node = getattr(node, part)
        else:
            return False
    return True


def get_constant(profile: "HardwareProfile", key: str) -> float:
    """The number at ``key`` (a dotted path) of ``profile``."""
    node: object = profile
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return float(node)  # type: ignore[arg-type]


def with_constants(profile: StrictModel, values: dict[str, float]) -> StrictModel:
    """A copy of ``profile`` with the numbers at the dotted ``values`` keys replaced (the fit's
    trial profiles; copied field by field, the values are SI numbers already)."""
    out = profile
    for key, value in values.items():
        out = _replace_path(out, key.split("."), value)
    return out


def _replace_path(node: StrictModel, parts: list[str], value: float) -> StrictModel:
    head = parts[0]
    if len(parts) == 1:
        return node.model_copy(update={head: value})
    return node.model_copy(update={head: _replace_path(getattr(node, head), parts[1:], value)})
