"""Impairment backends: which mechanism gives links their delay, jitter and loss.

``netem``: the kernel's ``sch_netem`` as the leaf of each shaped interface (exact per link and
direction). ``fallback`` (kernels without netem, e.g. this project's CI microVMs): HTB still
shapes the rate; loss is an iptables ``statistic`` drop in the receiving host's namespace
(:mod:`fabric.shaping.loss`); delay and jitter are a userspace NFQUEUE delayer holding packets at
the receiving host's ingress (:mod:`fabric.shaping.nfqdelay`).

Detection does not trust ``modprobe``: it adds a netem qdisc to a throwaway veth pair inside a
throwaway namespace named with the testbed's prefix, and deletes both.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Literal

Backend = Literal["netem", "fallback"]
BACKENDS: tuple[str, ...] = ("netem", "fallback")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]?$")
_detected: dict[str, Backend] = {}


def check_prefix(prefix: str) -> str:
    """Prefixes are 1-2 lowercase characters: they lead every name cleanup may delete."""
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r} must be 1-2 characters: a lowercase letter, then a letter or digit")
    return prefix


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def netem_available(prefix: str) -> bool:
    """Whether ``tc qdisc add ... netem`` works on this kernel (probed, result cached)."""
    check_prefix(prefix)
    if "netem" in _detected:
        return _detected["netem"] == "netem"
    ns = f"{prefix}probe{os.getpid()}"
    try:
        if _ip("netns", "add", ns).returncode != 0:
            raise RuntimeError(f"cannot create network namespace {ns} (are we root?)")
        made = _ip("-n", ns, "link", "add", f"{prefix}pr0", "type", "veth", "peer", "name", f"{prefix}pr1")
        if made.returncode != 0:
            raise RuntimeError(f"cannot create a veth pair in {ns}: {made.stderr.strip()}")
        probe = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", f"{prefix}pr0", "root", "netem",
                                "delay", "1ms", "loss", "1%"], capture_output=True, text=True)
        ok = probe.returncode == 0
    finally:
        _ip("netns", "del", ns)
    _detected["netem"] = "netem" if ok else "fallback"
    return ok


def resolve_backend(requested: str, prefix: str) -> Backend:
    """``auto`` -> what the kernel supports; ``netem`` is refused where it does not work."""
    if requested == "auto":
        return "netem" if netem_available(prefix) else "fallback"
    if requested == "netem":
        if not netem_available(prefix):
            raise RuntimeError("impairment backend 'netem' requested but this kernel has no sch_netem; "
                               "use 'auto' or 'fallback'")
        return "netem"
    if requested == "fallback":
        return "fallback"
    raise ValueError(f"impairment backend must be one of auto, netem, fallback; got {requested!r}")
