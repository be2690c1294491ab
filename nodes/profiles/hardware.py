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


class Interconnect(StrictModel):
    """The scale-up link between the chips of a node, used for tensor-parallel all-reduces."""

    bandwidth: ByteRate = Field(gt=0)  # per chip, one direction
    latency: Duration = Field(ge=0)  # fixed cost of one all-reduce (launch + hops)


class MultiSystem(StrictModel):
    """A model larger than one system's memory is split by layers across several systems
    (a pipeline); each step crosses ``systems - 1`` hops."""

    max_systems: int = Field(gt=1)
    hop_latency: Duration = Field(ge=0)
    hop_bandwidth: Bandwidth = Field(gt=0)


class Efficiency(StrictModel):
    """Fractions of the peaks that serving kernels reach (fitted)."""

    compute: Ratio = Field(gt=0)  # dense matmuls (MFU)
    attention: Ratio = Field(gt=0)  # attention score/value FLOPs (flash-style kernels)
    memory: Ratio = Field(gt=0)  # streaming weights, KV and activations (MBU)
    activation_traffic: float = Field(default=0.0, ge=0)  # elementwise bytes per token per layer, in units of (hidden + MLP width) x 2 B


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


class HardwareProfile(StrictModel):
    """One serving node (YAML ``kind: hardware``). Per-chip figures; ``chips`` per node."""

    KIND: ClassVar[str] = "hardware"

    name: ProfileName
    description: str = ""
    chips: int = Field(default=1, gt=0)  # accelerators in the node, sharing the model by tensor parallelism
    peak_flops: dict[Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4"], FlopRate]
    memory_kind: Literal["hbm", "sram"] = "hbm"
    memory_capacity: ByteSize = Field(gt=0)  # per chip: where weights and KV live
    memory_bandwidth: ByteRate = Field(gt=0)  # per chip
    memory_usable: Ratio = Field(default=1.0, gt=0)  # share of memory_capacity for weights + KV
    sram: ByteSize | None = None  # on-chip SRAM per chip, where it is not the main memory (informative)
    interconnect: Interconnect | None = None
    multi_system: MultiSystem | None = None
    efa_bandwidth: Bandwidth = Field(gt=0)  # per node
    efa_nics: int = Field(gt=0)
    efficiency: Efficiency
    prefill: Overheads = Overheads()
    decode: Overheads = Overheads()
    sources: dict[str, str]

    @model_validator(mode="after")
    def _consistent(self) -> "HardwareProfile":
        if "bf16" not in self.peak_flops:
            raise ValueError("peak_flops must state bf16 (the default serving dtype)")
        if self.chips > 1 and self.interconnect is None:
            raise ValueError(f"a node of {self.chips} chips needs 'interconnect' for its tensor-parallel all-reduces")
        if self.multi_system is not None and self.chips != 1:
            raise ValueError("multi_system describes a pipeline of single-chip systems: chips must be 1")
        unknown = sorted(k for k in self.sources if k.split(".")[0] not in type(self).model_fields)
        if unknown:
            raise ValueError(f"sources name keys that do not exist: {', '.join(unknown)}")
        needed = list(PUBLISHED_KEYS) + list(CALIBRATED_KEYS)
        needed += [k for k in ("interconnect", "multi_system", "sram") if getattr(self, k) is not None]
        missing = [k for k in needed if k not in self.sources]
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
