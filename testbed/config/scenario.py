"""The scenario schema: what one experiment runs, and how ``--set`` and sweeps change it.

A scenario names a topology and a model, chooses which of the topology's hosts serve
(pools), how KV caches travel, how the fabric is impaired, how time is dilated, what load
arrives (synthetic or a replayed trace), the SLOs that define goodput, a timeline of faults
and an optional sweep grid. Overrides (``--set key.path=value``) and sweep points are
applied to the raw YAML mapping *before* validation, so a bad value is reported against the
key path it came from, exactly like a bad value in the file.
"""
from __future__ import annotations

import itertools
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError, field_validator, model_validator

from nodes.profiles.models import ProfileName
from core.config import ConfigError, SafeName, StrictModel, problems_from_validation, read_yaml
from core.vocab import NETWORKS, DecodePolicy, KvMode, PrefillPolicy, Transport
from core.units import Bandwidth, ByteSize, Duration, Ratio
from testbed.runner.backend import BackendChoice

POOL_ROLES: tuple[str, ...] = ("prefill", "decode", "colocated")
LINK_ACTIONS: frozenset[str] = frozenset({"set_link", "link_down", "link_up"})
NODE_ACTIONS: frozenset[str] = frozenset({"crash", "slowdown", "drain", "resume", "restart"})
BROKER = "broker"  # the target of a restart fault on the control plane's MQTT broker

_TARGET = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


# ---------------------------------------------------------------- pools, router, KV
class PoolSpec(StrictModel):
    """Which of the topology's hosts of one role serve, and on what hardware."""

    hardware: ProfileName | None = None  # overrides the topology's hardware for this role
    count: int | None = Field(default=None, ge=1)  # first `count` hosts of the role; None = all


class PrefillPoolSpec(PoolSpec):
    """A prefill pool, and how its nodes batch prompts."""

    token_budget: int | None = Field(default=None, gt=0)  # prompt tokens per prefill step
    chunk_tokens: int | None = Field(default=None, ge=0)  # chunked prefill; 0 = whole prompts
    max_queue: int | None = Field(default=None, gt=0)  # prompts waiting to start; beyond, 503


class DecodePoolSpec(PoolSpec):
    """A decode pool, and how many sequences its nodes decode at once."""

    max_batch: int | None = Field(default=None, gt=0)
    max_queue: int | None = Field(default=None, gt=0)  # requests registered, not yet decoding; beyond, 503


class ColocatedPoolSpec(PrefillPoolSpec, DecodePoolSpec):
    """A colocated pool: both phases' batching keys."""


class Pools(StrictModel):
    prefill: PrefillPoolSpec | None = None
    decode: DecodePoolSpec | None = None
    colocated: ColocatedPoolSpec | None = None


class RouterSpec(StrictModel):
    prefill_policy: PrefillPolicy = "round_robin"
    decode_policy: DecodePolicy = "kv_aware"
    request_timeout: Duration = "600s"  # model time before the router fails a request
    max_inflight: int = Field(default=512, gt=0)  # requests in flight at once; beyond, 429 + Retry-After
    retries: int = Field(default=1, ge=0)  # a request whose node is lost mid-way is retried on other nodes
    client_timeout: Duration = "10s"  # WALL time a client has for a complete request (slowloris bound)


class KvTransferSpec(StrictModel):
    mode: KvMode = "whole"
    chunk_bytes: ByteSize = "256KiB" # on-wire chunk size of the handoff protocol
    timeout: Duration = "120s" # model time a decode node waits for a KV cache
    # srd: SRD-like reliable datagrams sprayed over every path (EFA's transport, nodes/srd.py);
    # tcp: one TCP connection per transfer (nodes/kvproto.py), kept for comparison
    transport: Transport = "srd"
    rto: Duration = "50us"  # SRD retransmission timer, model time (x TDF, floored at 2 ms wall)

    @field_validator("chunk_bytes")
    @classmethod
    def _chunk_range(cls, v: int) -> int:
        if not 1024 <= v <= 16 * 1024 * 1024:
            raise ValueError(f"chunk_bytes must be between 1KiB and 16MiB, got {v} bytes")
        return v


# ---------------------------------------------------------------- fabric overrides
class LinkOverride(StrictModel):
    """Model-time link parameters that replace the topology's for a whole link class."""

    bandwidth: Bandwidth | None = None
    latency: Duration | None = None
    jitter: Duration | None = None
    loss: Ratio | None = None
    mtu: int | None = Field(default=None, ge=576, le=65535)
    queue: int | None = Field(default=None, ge=1, le=1_000_000)  # packets

    @field_validator("bandwidth")
    @classmethod
    def _positive_bw(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("bandwidth must be positive")
        return v

    def updates(self) -> dict[str, Any]:
        """The set fields under ``fabric.topology.LinkParams`` names (SI units)."""
        names = {"bandwidth": "bandwidth_bps", "latency": "latency_s", "jitter": "jitter_s",
                 "loss": "loss", "mtu": "mtu", "queue": "queue_packets"}
        return {names[k]: v for k, v in self.model_dump(exclude_none=True).items()}


class FabricSpec(StrictModel):
    efa: LinkOverride | None = None
    frontend: LinkOverride | None = None
    mgmt: LinkOverride | None = None

    def overrides(self) -> dict[str, dict[str, Any]]:
        """link class -> LinkParams field updates, for classes that have any."""
        out = {}
        for cls in NETWORKS:
            spec = getattr(self, cls)
            if spec is not None and spec.updates():
                out[cls] = spec.updates()
        return out

    def link_params(self) -> dict[str, Any]:
        """link class -> ``fabric.topology.LinkParams`` holding only the overridden fields
        (``LinkParams.merged`` and ``FabricNet(overrides=...)`` take these)."""
        from fabric.topology import LinkParams

        return {cls: LinkParams().model_copy(update=upd) for cls, upd in self.overrides().items()}


# ---------------------------------------------------------------- emulation
class EmulationSpec(StrictModel):
    backend: BackendChoice = "auto"
    tdf: float | Literal["auto"] = "auto"
    byte_scale: float | Literal["auto"] = "auto"
    impairment: Literal["auto", "netem", "fallback"] = "auto"
    wall_budget: Duration | None = None  # stop a run that would take longer in wall time
    rto_min: Duration | Literal["auto"] = "auto"  # model time; TCP's minimum RTO on emulated links

    @field_validator("tdf")
    @classmethod
    def _tdf(cls, v: float | str) -> float | str:
        if v != "auto" and not 1.0 <= float(v) <= 100000.0:
            raise ValueError("tdf must be 'auto' or a number >= 1 (wall seconds per model second)")
        return v

    @field_validator("byte_scale")
    @classmethod
    def _byte_scale(cls, v: float | str) -> float | str:
        if v != "auto" and not 0.0 < float(v) <= 1.0:
            raise ValueError("byte_scale must be 'auto' or a number in (0, 1]")
        return v


# ---------------------------------------------------------------- workload
class ArrivalSpec(StrictModel):
    process: Literal["poisson", "gamma", "fixed"] = "poisson"
    rate: float = Field(gt=0)  # requests per model second
    burstiness: float = Field(default=1.0, gt=0)  # gamma: squared coefficient of variation of gaps

    @model_validator(mode="after")
    def _burstiness_only_for_gamma(self) -> "ArrivalSpec":
        if self.process != "gamma" and self.burstiness != 1.0:
            raise ValueError(f"burstiness applies to process 'gamma' only (process is {self.process!r})")
        return self


class FixedLength(StrictModel):
    dist: Literal["fixed"]
    value: int = Field(ge=1)

    @property
    def largest(self) -> int:
        return self.value


class UniformLength(StrictModel):
    dist: Literal["uniform"]
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _order(self) -> "UniformLength":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    @property
    def largest(self) -> int:
        return self.max


class LognormalLength(StrictModel):
    """Lengths whose logarithm is normal; ``mean`` is the mean of the lengths (before clipping)."""

    dist: Literal["lognormal"]
    mean: float = Field(gt=1)
    sigma: float = Field(gt=0, le=4)  # standard deviation of log(length)
    min: int = Field(default=1, ge=1)
    max: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "LognormalLength":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self

    @property
    def largest(self) -> int | None:
        """None: unbounded, a rare draw may exceed the context (that request fails with a reason)."""
        return self.max


def _length_shorthand(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"dist": "fixed", "value": value}
    if not isinstance(value, dict):
        raise ValueError("expected a token count (an integer) or a mapping {dist: fixed|uniform|lognormal, ...}")
    return value


Length = Annotated[Union[FixedLength, UniformLength, LognormalLength], Field(discriminator="dist"),
                   BeforeValidator(_length_shorthand)]
"""Token counts: a plain integer (fixed) or ``{dist: fixed|uniform|lognormal, ...}``."""


class TraceSpec(StrictModel):
    """Replay of a CSV in the Azure LLM inference format (TIMESTAMP,ContextTokens,GeneratedTokens)."""

    path: str = Field(min_length=1)  # relative paths resolve against the scenario file's folder
    start: Duration = 0.0  # offset into the trace (trace time) where replay begins
    window: Duration | None = None  # how much trace time to replay; None = to the end
    speedup: float = Field(default=1.0, gt=0)  # model arrival = trace offset / speedup
    sample: Ratio = 1.0  # keep each request with this probability (seeded)

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data

    @field_validator("sample")
    @classmethod
    def _sample_positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("sample must be > 0 (a fraction of requests to keep)")
        return v


class WorkloadSpec(StrictModel):
    arrival: ArrivalSpec | None = None
    requests: int | None = Field(default=None, ge=1)  # synthetic: how many; trace: at most this many
    duration: Duration | None = None  # synthetic: arrivals within; trace: model-time cap on arrivals
    prompt_tokens: Length | None = None
    output_tokens: Length | None = None
    trace: TraceSpec | None = None
    seed: int = 0
    stream: bool = True  # the client asks for a token stream (SSE); False: one JSON answer at the end

    @field_validator("duration")
    @classmethod
    def _duration_positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("duration must be positive")
        return v

    @model_validator(mode="after")
    def _complete(self) -> "WorkloadSpec":
        if self.trace is not None:
            extra = [k for k in ("arrival", "prompt_tokens", "output_tokens") if getattr(self, k) is not None]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} cannot be combined with trace (arrivals and lengths come from the "
                    f"file); remove them or --set workload.{extra[0]}=null")
            return self
        missing = [k for k in ("arrival", "prompt_tokens", "output_tokens") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a synthetic workload needs {', '.join(missing)} (or give a trace)")
        if self.requests is None and self.duration is None:
            raise ValueError("give requests (a count) or duration (model time), or both (whichever ends first)")
        return self


# ---------------------------------------------------------------- SLO and faults
class SloSpec(StrictModel):
    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)


class FaultSpec(StrictModel):
    at: Duration  # model time since the run's start
    action: Literal["set_link", "link_down", "link_up", "crash", "slowdown", "drain", "resume", "restart"]
    target: str  # link name or link class (link actions); node name (node actions); restart: a node or "broker"
    bandwidth: Bandwidth | None = None
    latency: Duration | None = None
    jitter: Duration | None = None
    loss: Ratio | None = None
    factor: float | None = Field(default=None, ge=1.0)  # slowdown: compute takes factor x longer

    @field_validator("target")
    @classmethod
    def _safe_target(cls, v: str) -> str:
        if not _TARGET.match(v):
            raise ValueError(f"{v!r} is not a valid link or node name (lowercase letters, digits, '-', '_')")
        return v

    @model_validator(mode="after")
    def _fields_match_action(self) -> "FaultSpec":
        link_fields = [k for k in ("bandwidth", "latency", "jitter", "loss") if getattr(self, k) is not None]
        if self.action == "set_link":
            if not link_fields:
                raise ValueError("set_link needs at least one of bandwidth, latency, jitter, loss")
        elif link_fields:
            raise ValueError(f"{', '.join(link_fields)} only apply to action set_link")
        if self.action == "slowdown" and self.factor is None:
            raise ValueError("slowdown needs factor (>= 1)")
        if self.action != "slowdown" and self.factor is not None:
            raise ValueError("factor only applies to action slowdown")
        return self

    def link_updates(self) -> dict[str, Any]:
        """set_link's changes under FabricNet.set_link keyword names."""
        names = {"bandwidth": "bandwidth_bps", "latency": "latency_s", "jitter": "jitter_s", "loss": "loss"}
        return {v: getattr(self, k) for k, v in names.items() if getattr(self, k) is not None}


# ---------------------------------------------------------------- the scenario
class ScenarioConfig(StrictModel):
    KIND: ClassVar[str] = "scenario"

    name: SafeName
    description: str = ""
    topology: str = Field(min_length=1)  # a topology name (topologies/NAME.yaml) or a path to a file
    model: ProfileName  # a shipped model profile (nodes/profiles/data/models/)
    pools: Pools = Pools()
    router: RouterSpec = RouterSpec()
    kv_transfer: KvTransferSpec = KvTransferSpec()
    fabric: FabricSpec = FabricSpec()
    emulation: EmulationSpec = EmulationSpec()
    workload: WorkloadSpec
    slo: SloSpec | None = None
    faults: list[FaultSpec] = []
    sweep: dict[str, list[Any]] = {}

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="<scenario>")
    _checked: bool = PrivateAttr(default=False)  # references checked (sweep points are checked too)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_and_check_sweep(cls, data: Any, handler: Any) -> "ScenarioConfig":
        """Keep the mapping (sweeps re-apply their points to it) and validate every sweep value,
        however the config was loaded (``load_scenario`` or ``pdtb validate``)."""
        sc = handler(data)
        if isinstance(data, dict):
            sc._raw = _deepcopy({k: v for k, v in data.items() if k != "kind"})
            problems = sweep_problems(sc._raw)
            if problems:
                raise ValueError(_SWEEP_SEP.join(f"{p}: {m}" for p, m in problems))
        return sc

    @field_validator("faults")
    @classmethod
    def _faults_sorted(cls, v: list[FaultSpec]) -> list[FaultSpec]:
        return sorted(v, key=lambda f: f.at)

    @field_validator("sweep")
    @classmethod
    def _sweep_shape(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"sweep key {key!r} has no values")
            if key == "sweep" or key.startswith("sweep."):
                raise ValueError("a sweep cannot sweep itself")
        return v

    # -- paths resolve against the scenario file's folder
    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    @property
    def raw(self) -> dict[str, Any]:
        """The mapping this config was validated from (after overrides), without ``kind``."""
        return _deepcopy(self._raw)

    def resolved_raw(self) -> dict[str, Any]:
        """``raw`` with its file references (topology file, trace) made absolute, so a copy of it
        saved anywhere (a run's ``scenario.yaml``) loads as the same scenario."""
        data = self.raw
        data["topology"] = self.topology_ref()
        trace = data.get("workload", {}).get("trace")
        if self.workload.trace is not None and trace is not None:
            path = str(self.trace_path())
            data["workload"]["trace"] = {**trace, "path": path} if isinstance(trace, dict) else path
        return data

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self._base_dir / path).resolve()

    def topology_ref(self) -> str:
        """What ``fabric.topology.load_topology`` takes: a bare name, or a resolved file path."""
        t = self.topology
        if "/" in t or t.endswith((".yaml", ".yml")):
            return str(self.resolve_path(t))
        return t

    def trace_path(self) -> Path | None:
        return self.resolve_path(self.workload.trace.path) if self.workload.trace else None

    def pool_roles(self) -> tuple[str, ...]:
        """Compute roles that serve: those named in ``pools`` (prefill and decode come as a pair:
        naming one brings the other with all its hosts), or every role when ``pools`` is empty."""
        p = self.pools
        if p == Pools():
            return POOL_ROLES
        roles = ("prefill", "decode") if (p.prefill or p.decode) else ()
        return roles + (("colocated",) if p.colocated else ())

    @property
    def disaggregated(self) -> bool:
        """True unless the scenario serves from colocated nodes only."""
        return "prefill" in self.pool_roles()


# ---------------------------------------------------------------- key paths
_SEGMENT = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)(?P<idx>(?:\[[0-9]+\])*)$")


def split_key_path(path: str) -> list[str | int]:
    """``'faults[0].at'`` -> ``['faults', 0, 'at']``; raises ValueError on bad syntax."""
    parts: list[str | int] = []
    if not path:
        raise ValueError("empty key path")
    for seg in path.split("."):
        m = _SEGMENT.match(seg)
        if not m:
            raise ValueError(f"bad key path segment {seg!r}")
        parts.append(m["key"])
        parts.extend(int(i) for i in re.findall(r"\[([0-9]+)\]", m["idx"]))
    return parts


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types a field annotation may hold (Optional, Union, Annotated peeled)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _unwrap(a)]
    return [tp]


def _schema_has_path(parts: list[str | int]) -> bool:
    """Whether the key path names a field of the scenario schema (present in a file or not)."""
    candidates: list[Any] = [ScenarioConfig]
    for part in parts:
        nxt: list[Any] = []
        for tp in candidates:
            origin = typing.get_origin(tp)
            if isinstance(part, int):
                if origin is list:
                    nxt.extend(_unwrap(typing.get_args(tp)[0]))
            elif isinstance(tp, type) and issubclass(tp, BaseModel):
                field = tp.model_fields.get(part)
                if field is not None:
                    nxt.extend(_unwrap(field.annotation))
            elif origin is dict or tp is Any:
                nxt.append(Any)
        if not nxt:
            return False
        candidates = nxt
    return True


_SWEEP_SEP = "\n"  # joins sweep problems inside one validation error; split again by _validate
_UNION_TAG = re.compile(r"(prompt_tokens|output_tokens)\.(fixed|uniform|lognormal)\b")


def _validate(data: dict[str, Any], source: str) -> ScenarioConfig:
    """Validate a raw mapping; problems name plain key paths (no union tags)."""
    try:
        return ScenarioConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for path, msg in problems_from_validation(err):
            if not path and msg.startswith("sweep."):  # from _keep_raw_and_check_sweep: one per line
                problems.extend(tuple(line.split(": ", 1)) for line in msg.split(_SWEEP_SEP))
            else:
                problems.append((_UNION_TAG.sub(r"\1", path), msg))
        raise ConfigError(source, list(dict.fromkeys(problems))) from None


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def set_key_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``path`` in a raw scenario mapping, creating missing mappings on the way.

    Raises ValueError (with a message for the user) for a path the schema does not have.
    ``None`` (``--set key=null``) removes a mapping key, so its default applies. A string set
    on a key that holds a mapping with a ``path`` (``workload.trace=FILE``) replaces only that
    ``path``, so the rest of the trace settings stay. ``sweep.KEY.PATH`` sets one sweep axis.
    """
    if path.startswith("sweep."):
        _set_sweep_axis(data, path[len("sweep."):], value)
        return
    parts = split_key_path(path)
    if parts[0] in ("kind",) or not _schema_has_path(parts):
        raise ValueError("unknown key path (not a scenario setting)")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = isinstance(parts[i + 1], int)
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ValueError(f"index [{part}] is out of range")
        if not isinstance(node[part] if isinstance(part, int) else node.get(part), (dict, list)):
            current = node[part] if isinstance(part, int) else node.get(part)
            node[part] = [] if nxt_is_index else _expand_shorthand(parts[: i + 1], current)
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ValueError(f"index [{last}] is out of range")
        node[last] = value
        return
    current = node.get(last)
    if value is None:
        node.pop(last, None)
    elif isinstance(current, dict) and "path" in current and isinstance(value, str):
        current["path"] = value
    else:
        node[last] = value


def _set_sweep_axis(data: dict[str, Any], key: str, value: Any) -> None:
    """``sweep.KEY.PATH=[v1, v2]``: add or replace the axis ``KEY.PATH`` (a key path itself,
    checked like any other); ``null`` removes the axis. Sweep keys contain dots, so this is
    the only way ``--set`` reaches one of them."""
    try:
        parts = split_key_path(key)
    except ValueError as exc:
        raise ValueError(f"sweep key: {exc}") from None
    if parts[0] == "sweep":
        raise ValueError("a sweep cannot sweep itself")
    if parts[0] == "kind" or not _schema_has_path(parts):
        raise ValueError("unknown key path (not a scenario setting)")
    sweep = data.get("sweep")
    if sweep is None:
        sweep = data["sweep"] = {}
    elif not isinstance(sweep, dict):
        raise ValueError(f"sweep must be a mapping of key paths to lists, got {type(sweep).__name__}")
    if value is None:
        sweep.pop(key, None)
        if not sweep:
            data.pop("sweep")
    elif not isinstance(value, list):
        raise ValueError(f"a sweep axis takes a list of values, e.g. [1, 2], got {value!r}")
    else:
        sweep[key] = value


def _expand_shorthand(parts: list[str | int], value: Any) -> dict[str, Any]:
    """The mapping a scalar shorthand stands for, so a deeper key can be set inside it
    (``workload.trace: FILE`` -> ``{path: FILE}``, ``prompt_tokens: 512`` -> ``{dist: fixed, value: 512}``)."""
    if parts == ["workload", "trace"] and isinstance(value, str):
        return {"path": value}
    if parts in (["workload", "prompt_tokens"], ["workload", "output_tokens"]) and isinstance(value, int):
        return {"dist": "fixed", "value": value}
    return {}


def parse_override(item: str) -> tuple[str, Any]:
    """``'workload.arrival.rate=4'`` -> ``('workload.arrival.rate', 4)``; the value is read as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", [(item, "expected KEY.PATH=VALUE")])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # not YAML: keep the text, validation says whether it fits
    return key, value


# ---------------------------------------------------------------- loading
def scenario_from_data(data: Any, source: str, base_dir: Path, overrides: list[tuple[str, Any]] = ()) -> ScenarioConfig:
    """Validate a raw mapping (``kind`` already removed) after applying ``(key, value)`` overrides."""
    if not isinstance(data, dict):
        raise ConfigError(source, [("", f"expected a mapping of keys, got {type(data).__name__}")])
    data = _deepcopy(data)
    problems = []
    for key, value in overrides:
        try:
            set_key_path(data, key, value)
        except ValueError as exc:
            problems.append((key, str(exc)))
    if problems:
        raise ConfigError(source, problems)
    sc = _validate(data, source)
    sc._base_dir = base_dir
    sc._source = source
    return sc


def sweep_problems(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Each sweep key must be a settable path and each of its values valid on its own."""
    problems: list[tuple[str, str]] = []
    sweep = raw.get("sweep") or {}
    for key, values in sweep.items() if isinstance(sweep, dict) else ():
        try:
            parts = split_key_path(key)
        except ValueError as exc:
            problems.append((f"sweep.{key}", str(exc)))
            continue
        if parts[0] == "sweep" or not _schema_has_path(parts):
            problems.append((f"sweep.{key}", "unknown key path (not a scenario setting)"))
            continue
        for i, value in enumerate(values):
            data = {k: _deepcopy(v) for k, v in raw.items() if k != "sweep"}
            try:
                set_key_path(data, key, value)
                _validate(data, "")
            except ValueError as exc:
                problems.append((f"sweep.{key}[{i}]", str(exc)))
            except ConfigError as exc:
                problems.extend((f"sweep.{key}[{i}]", f"{p or '<top>'}: {m}") for p, m in exc.problems)
    return problems


def load_scenario(path: str | Path, overrides: list[str] = [], *, check_refs: bool = True) -> ScenarioConfig:
    """Read a scenario file, apply ``--set`` overrides, validate it.

    With ``check_refs`` the model, the hardware, the pools and the fault targets are checked
    against the profiles and the topology (:func:`check_references`).
    """
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict) and "kind" in data:
        if data["kind"] != ScenarioConfig.KIND:
            raise ConfigError(str(path), [("kind", f"expected 'scenario' here, got {data['kind']!r}")])
        data = {k: v for k, v in data.items() if k != "kind"}
    sc = scenario_from_data(data, str(path), path.resolve().parent, [parse_override(o) for o in overrides])
    if check_refs:
        check_references(sc)
        sc._checked = True
    return sc


def expand_sweep(sc: ScenarioConfig) -> list[tuple[dict[str, Any], ScenarioConfig]]:
    """The sweep grid: the cartesian product of the sweep values, each point re-validated.

    Without a sweep, one point: ``({}, sc)``. The configs of the points have no ``sweep``.
    """
    if not sc.sweep:
        return [({}, sc)]
    keys = list(sc.sweep)
    base = sc.raw
    base.pop("sweep", None)
    points = []
    for values in itertools.product(*(sc.sweep[k] for k in keys)):
        point = dict(zip(keys, values))
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        cfg = scenario_from_data(base, f"{sc.source} [sweep {label}]", sc.base_dir, list(point.items()))
        if sc._checked:
            check_references(cfg)
            cfg._checked = True
        points.append((point, cfg))
    return points


def point_label(point: dict[str, Any]) -> str:
    """A short file-name-safe label of a sweep point, e.g. ``fabric.efa.loss=0.01,kv_transfer.mode=whole``."""
    text = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=-]", "_", text)


# ---------------------------------------------------------------- against the topology
def topology_problems(sc: ScenarioConfig, topo: Any) -> list[tuple[str, str]]:
    """Problems of ``sc`` against a loaded topology (``hosts`` with ``name``/``role``, ``links`` with ``name``)."""
    problems: list[tuple[str, str]] = []
    by_role: dict[str, list[str]] = {}
    for h in topo.hosts:
        by_role.setdefault(h.role, []).append(h.name)
    for role in (sc.pool_roles() if sc.pools != Pools() else ()):
        pool = getattr(sc.pools, role)
        have = len(by_role.get(role, []))
        if have == 0:
            problems.append((f"pools.{role}", f"topology {sc.topology!r} has no {role} hosts"))
        elif pool is not None and pool.count is not None and pool.count > have:
            problems.append((f"pools.{role}.count", f"topology {sc.topology!r} has only {have} {role} host(s), "
                                                    f"asked for {pool.count}"))
    if sc.pools == Pools():
        if not any(by_role.get(r) for r in POOL_ROLES):
            problems.append(("pools", f"topology {sc.topology!r} has no prefill, decode or colocated hosts"))
        elif bool(by_role.get("prefill")) != bool(by_role.get("decode")):
            problems.append(("pools", f"topology {sc.topology!r} has prefill hosts without decode hosts or the "
                                      "other way round"))
    nodes = {h.name for h in topo.hosts}
    links = {link.name for link in topo.links}
    for i, f in enumerate(sc.faults):
        if f.action in LINK_ACTIONS:
            if f.target not in links and f.target not in NETWORKS:
                problems.append((f"faults[{i}].target", f"{f.target!r} is not a link of topology {sc.topology!r} "
                                                        f"nor a link class ({', '.join(NETWORKS)})"))
        elif f.target not in nodes and not (f.action == "restart" and f.target == BROKER):
            problems.append((f"faults[{i}].target", f"{f.target!r} is not a host of topology {sc.topology!r}"))
    return problems


def selected_hosts(sc: ScenarioConfig, topo: Any) -> dict[str, list[tuple[str, str | None]]]:
    """role -> [(host name, hardware)] of the compute hosts the scenario uses, in topology order
    (see :meth:`ScenarioConfig.pool_roles`); hosts keep the topology's hardware unless the pool names one."""
    out: dict[str, list[tuple[str, str | None]]] = {}
    for role in sc.pool_roles():
        pool = getattr(sc.pools, role)
        hosts = [h for h in topo.hosts if h.role == role]
        if pool is not None and pool.count is not None:
            hosts = hosts[:pool.count]
        hw = pool.hardware if pool is not None else None
        if hosts:
            out[role] = [(h.name, hw or getattr(h, "hardware", None)) for h in hosts]
    return out


def check_references(sc: ScenarioConfig) -> Any:
    """Load the scenario's topology and profiles; raise ConfigError if the scenario does not fit them.

    Returns the loaded topology.
    """
    from fabric.topology import load_topology
    from nodes.costmodel import CostModel
    from nodes.profiles import hardware_names, load_hardware, load_model, model_names

    problems: list[tuple[str, str]] = []
    if sc.model not in model_names():
        problems.append(("model", f"no model profile named {sc.model!r}; known: {', '.join(model_names())}"))
    try:
        topo = load_topology(sc.topology_ref())
    except ConfigError as exc:
        raise ConfigError(sc.source, [("topology", str(exc))]) from None
    problems += topology_problems(sc, topo)
    for role, hosts in selected_hosts(sc, topo).items():
        for host, hw in hosts:
            if hw not in hardware_names():
                where = f"pools.{role}.hardware" if getattr(sc.pools, role) and getattr(sc.pools, role).hardware \
                    else "topology"
                problems.append((where, f"host {host!r}: no hardware profile named {hw!r}; known: "
                                        f"{', '.join(hardware_names())}"))
    if problems:
        raise ConfigError(sc.source, list(dict.fromkeys(problems)))
    model = load_model(sc.model)
    w = sc.workload
    if w.prompt_tokens is not None and w.output_tokens is not None:
        prompt, output = w.prompt_tokens.largest, w.output_tokens.largest
        if prompt is not None and output is not None and prompt + output > model.context_length:
            problems.append(("workload", f"prompt_tokens + output_tokens reach {prompt + output} tokens, more than "
                                         f"the {model.context_length}-token context of {sc.model}: the router "
                                         f"would refuse those requests"))
    for role, hosts in selected_hosts(sc, topo).items():
        for hw in sorted({hw for _, hw in hosts}):
            if not CostModel(load_hardware(hw), model).fits():
                problems.append((f"pools.{role}", f"the weights of {sc.model} do not fit the memory of {hw}"))
    if problems:
        raise ConfigError(sc.source, list(dict.fromkeys(problems)))
    return topo
