"""Random loss without netem: iptables ``statistic`` drops in the receiving host's namespace.

Each shaped interface of a host gets its own chain in the ``mangle`` table, jumped to from
``PREROUTING -i INTF``. Rules can name a source address, so the loss of every link on the
packet's path (sender's uplink, switch hops, receiver's downlink) is applied exactly once:
``p = 1 - prod(1 - p_link)``. ``mangle`` runs after ``raw``, where the NFQUEUE delayer holds
packets, so a packet is delayed then dropped (or not); the order does not change the statistics.
Every rule carries the comment ``pdtb:<prefix>`` so cleanup can recognise it.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any


@dataclass(frozen=True)
class LossRule:
    """Drop packets from ``source`` (None: any source not named by an earlier rule) with ``probability``."""

    source: str | None
    probability: float


class LossRules:
    """The loss chain of one interface inside one host's namespace."""

    def __init__(self, host: Any, intf_name: str, prefix: str) -> None:
        self.host = host
        self.intf_name = intf_name
        self.comment = f"pdtb:{prefix}:loss"
        self.chain = f"{prefix}loss-{intf_name}"
        self.rules: list[LossRule] = []
        self._jump_installed = False

    def set(self, rules: list[LossRule]) -> None:
        """Replace the chain's rules in one ``iptables-restore`` transaction."""
        LossRules.set_many([(self, rules)])

    def _lines(self, rules: list[LossRule]) -> list[str]:
        lines = [f":{self.chain} - [0:0]"]
        for rule in rules:
            if not 0.0 <= rule.probability <= 1.0:
                raise ValueError(f"loss probability {rule.probability!r} not in [0, 1]")
            match = []
            if rule.source is not None:
                match = ["-s", f"{IPv4Address(rule.source)}/32"]
            if rule.probability > 0:
                lines.append(" ".join(["-A", self.chain, *match, "-m", "statistic", "--mode", "random",
                                       "--probability", f"{rule.probability:.10f}", "-m", "comment",
                                       "--comment", self.comment, "-j", "DROP"]))
            if rule.source is not None:
                lines.append(" ".join(["-A", self.chain, *match, "-j", "RETURN"]))
        if not self._jump_installed:
            lines.append(f"-A PREROUTING -i {self.intf_name} -m comment --comment {self.comment} -j {self.chain}")
        return lines

    @staticmethod
    def set_many(changes: list[tuple["LossRules", list[LossRule]]]) -> None:
        """Replace the rules of several chains of ONE host (a host's rails) in one
        ``iptables-restore`` transaction: one process instead of one per interface."""
        if not changes:
            return
        host = changes[0][0].host
        if any(c.host is not host for c, _ in changes):
            raise ValueError("set_many changes the chains of one host")
        lines = ["*mangle"]
        for chains, rules in changes:
            lines += chains._lines(rules)
        lines.append("COMMIT")
        proc = host.popen(["iptables-restore", "-w", "5", "--noflush"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(("\n".join(lines) + "\n").encode(), timeout=15)
        if proc.returncode != 0:
            names = ", ".join(c.intf_name for c, _ in changes)
            raise RuntimeError(f"iptables-restore in {host.name} for {names} failed: "
                               f"{(err or out).decode(errors='replace').strip()}")
        for chains, rules in changes:
            chains._jump_installed = True
            chains.rules = list(rules)
