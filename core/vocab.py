"""The project's words, each defined once: node roles, network (link) classes, routing policies,
KV handoff modes, and the request-id pattern and format. Config models, the fabric, the daemons,
the simulator and the metrics import them from here, so a new word is added in one place.
Timeline event names live in ``nodes.timeline.EVENTS`` (a test checks docs/timeline.md and the
readers of events against it)."""
from __future__ import annotations

import re
from typing import Literal, get_args

Role = Literal["router", "prefill", "decode", "colocated", "client"]
ROLES: tuple[str, ...] = get_args(Role)
COMPUTE_ROLES: tuple[str, ...] = ("prefill", "decode", "colocated")
KV_ROLES: tuple[str, ...] = ("prefill", "decode")  # the two ends of a KV handoff

LinkClass = Literal["frontend", "efa", "mgmt"]
NETWORKS: tuple[str, ...] = get_args(LinkClass)  # in address-plan order
SCALED_NETWORKS: tuple[str, ...] = ("efa",)  # carries KV caches: byte scale applies

PrefillPolicy = Literal["round_robin", "least_loaded"]
DecodePolicy = Literal["round_robin", "least_loaded", "kv_aware"]
KvMode = Literal["whole", "layerwise"]
Transport = Literal["srd", "tcp"]  # KV handoff: SRD-like datagrams (nodes/srd.py) or TCP (nodes/kvproto.py)
TRANSPORTS: tuple[str, ...] = get_args(Transport)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""A request id (client header ``x-request-id``, timeline, KV frames): safe in file names and logs."""


def request_id(index: int) -> str:
    """The id the load generator gives the workload's request ``index``."""
    return f"r{index:06d}"
