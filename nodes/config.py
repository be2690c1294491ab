"""The small per-node file a daemon is started with.

The testbed writes one JSON file per node (mode 0600: it holds the run's secrets) and
starts ``python -m nodes --config FILE``. Daemons know nothing of Mininet or scenarios:
only addresses, a role, profiles, TDF and byte scale. Values are in SI base units.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nodes.profiles.models import ProfileName
from core.config import NodeName, SafeName
from core.vocab import COMPUTE_ROLES, DecodePolicy, KvMode, PrefillPolicy, Role, Transport



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    host: str
    port: int = Field(ge=1, le=65535)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class PeerInfo(_Strict):
    """Another node as the router (or a client) sees it."""

    name: NodeName
    role: Role
    http: Endpoint | None = None  # frontend address of its HTTP API
    kv: Endpoint | None = None  # backend (EFA) address of its KV receiver; decode and colocated nodes
    kv_addrs: list[str] = []  # its KV receiver's address on each rail, rail order (kv.host is rail 0's)
    hardware: ProfileName | None = None


class MqttSettings(_Strict):
    host: str
    port: int = Field(ge=1, le=65535)
    username: str
    password: str
    topic_prefix: str  # e.g. "pdtb/<run_id>"; status under {prefix}/nodes/{name}/status
    heartbeat_s: float = Field(default=0.5, gt=0)  # wall seconds between load reports


class KvSettings(_Strict):
    mode: KvMode = "whole"
    secret_hex: str = Field(min_length=32)  # per-run HMAC key for the handoff handshake
    chunk_bytes: int = Field(default=256 * 1024, gt=0, le=16 * 1024 * 1024)
    timeout_s: float = Field(default=120.0, gt=0)  # model seconds a decode node waits for a KV cache
    transport: Transport = "tcp"  # how this node sends KV; a decode node receives both on its KV port
    rate_bps: float = Field(default=0.0, ge=0)  # this node's EFA wire rate per rail (dilated); 0 = unshaped
    mtu: int = Field(default=1500, ge=576, le=65535)  # EFA link MTU: SRD packet size
    rto_s: float = Field(default=50e-6, gt=0)  # SRD retransmission timer, model seconds (x TDF, floored)


class RouterSettings(_Strict):
    prefill_policy: PrefillPolicy = "round_robin"
    decode_policy: DecodePolicy = "kv_aware"
    request_timeout_s: float = Field(default=600.0, gt=0)  # model seconds before a request fails
    max_inflight: int = Field(default=512, gt=0)  # requests the router holds at once; more get 429
    retries: int = Field(default=1, ge=0)  # tries on other nodes after a node is lost mid-request
    # wall seconds a client connection may sit without a complete request (headers, idle
    # keep-alive) or take to send its body: a slowloris cannot hold the router's connections
    client_timeout_s: float = Field(default=10.0, gt=0)


class PrefillSettings(_Strict):
    token_budget: int = Field(default=16384, gt=0)  # tokens per prefill batch
    chunk_tokens: int = Field(default=0, ge=0)  # chunked prefill; 0 = whole prompts
    max_queue: int = Field(default=256, gt=0)  # requests waiting for their prefill; more get 503


class DecodeSettings(_Strict):
    max_batch: int = Field(default=256, gt=0)
    max_queue: int = Field(default=512, gt=0)  # requests registered and not yet decoding; more get 503


class ClientSettings(_Strict):
    workload_file: str  # JSONL of {"index", "arrival_s" (model s), "prompt_tokens", "output_tokens"}
    router: Endpoint
    stream: bool = True
    request_timeout_s: float = Field(default=600.0, gt=0)  # model seconds


class NodeConfig(_Strict):
    run_id: SafeName
    name: NodeName
    role: Role
    model: ProfileName
    hardware: ProfileName | None = None  # compute roles only
    tdf: float = Field(ge=1.0)
    byte_scale: float = Field(gt=0.0, le=1.0)
    t0_wall: float  # epoch seconds shared by all nodes: t_model = (wall - t0_wall) / tdf
    run_dir: str
    http: Endpoint | None = None  # where this node's HTTP API listens (frontend network)
    kv: Endpoint | None = None  # where a decode/colocated node's KV receiver listens (EFA network)
    kv_bind: str | None = None  # source address for outgoing KV connections (prefill on EFA)
    kv_addrs: list[str] = []  # this node's EFA address per rail, rail order: a decode node's receiver
    # listens on each, a prefill node binds its connection to rail k of a peer to kv_addrs[k % n]
    peers: list[PeerInfo] = []
    mqtt: MqttSettings | None = None
    kv_transfer: KvSettings | None = None
    router: RouterSettings = RouterSettings()
    prefill: PrefillSettings = PrefillSettings()
    decode: DecodeSettings = DecodeSettings()
    client: ClientSettings | None = None
    # per-run secret authenticating the internal HTTP API (nodes.auth); the router and the
    # compute nodes must have it, so a node's /internal/* is never open
    internal_secret_hex: str | None = Field(default=None, min_length=32, pattern=r"^[0-9a-fA-F]+$")

    @model_validator(mode="after")
    def _internal_secret_where_needed(self) -> "NodeConfig":
        if self.internal_secret_hex is None and self.role in ("router", *COMPUTE_ROLES):
            raise ValueError(f"a {self.role} node needs internal_secret_hex (the run's internal API secret)")
        return self

    @property
    def timeline_path(self) -> Path:
        return Path(self.run_dir) / "timeline" / f"{self.name}.jsonl"

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "NodeConfig":
        return cls.model_validate(json.loads(Path(path).read_text()))
