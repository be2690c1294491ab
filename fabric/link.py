"""Shaped links without Mininet's limits, and a Linux bridge switch that needs only iproute2.

Mininet's ``TCLink`` refuses ``bw`` above 1000 Mbit/s and needs ``sch_netem`` for delay and
loss. :class:`ShapedIntf` configures tc itself: an HTB root class at any rate (burst sized to
1 ms of the rate, explicit quantum, 64-bit rates), a leaf that is either ``pfifo`` (queue
limit) or, where the kernel has it, ``netem`` (delay, jitter, loss and the same queue limit).
Offloads (GRO/GSO/TSO) are switched off on shaped interfaces so rate, queue and loss act on
wire packets, not 64 KB super-packets. Both ends of a :class:`ShapedLink` are shaped with the
link's parameters: the host end's egress is the host's transmit direction, the switch end's
egress is the host's receive direction (where an incast queues).
"""
from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

from mininet.link import Intf, Link
from mininet.log import warn
from mininet.node import Switch
from mininet.nodelib import LinuxBridge

ETH_OVERHEAD = 14
NETEM_ORDER_RATE = 100_000_000_000
"""netem rate (bit/s) on jittered links, too high to shape anything: it only keeps packets in order."""
BURST_WALL_S = 0.001
"""HTB burst: one millisecond of the rate (at least two packets), so high rates are reachable
when HTB's wake-ups run late on a busy host, and low rates stay smooth. HTB never sends more
than ``rate x t + burst`` (measured: wire rate <= 1.0000 of the configured rate from 10 Mbit/s to
1 Gbit/s, docs/fabric.md); the burst is only a head start after an idle period."""


class TcError(RuntimeError):
    """A tc/ip/ethtool command failed on an interface."""


class ShapedIntf(Intf):
    """A veth end shaped by HTB (rate, queue) and optionally netem (delay, jitter, loss).

    ``rate_bps`` etc. are EMULATED values (already dilated). ``netem=False`` leaves delay,
    jitter and loss to the fallback backend (``fabric.shaping``) and shapes the rate only.
    """

    def config(self, rate_bps: float | None = None, latency_s: float = 0.0, jitter_s: float = 0.0,
               loss: float = 0.0, mtu: int | None = None, queue_packets: int = 1000, netem: bool = False,
               offload: bool | None = None, **params: Any) -> dict[str, Any]:
        result = super().config(**params)
        self.shape: dict[str, Any] = {}
        self.netem = netem
        self.applied = False
        self.leaf = ""
        if mtu is not None:
            self._run(["ip", "link", "set", "dev", self.name, "mtu", str(int(mtu))])
        self.mtu = int(mtu) if mtu is not None else 1500
        shaped = rate_bps is not None or latency_s > 0 or jitter_s > 0 or loss > 0
        if offload is None:
            offload = not shaped
        if not offload:
            self._run(["ethtool", "-K", self.name, "gro", "off", "gso", "off", "tso", "off"], check=False)
        self.reshape(rate_bps=rate_bps, latency_s=latency_s, jitter_s=jitter_s, loss=loss,
                     queue_packets=queue_packets)
        return result

    def reshape(self, *, rate_bps: float | None, latency_s: float = 0.0, jitter_s: float = 0.0,
                loss: float = 0.0, queue_packets: int = 1000) -> None:
        """Apply (or change at run time) the shaping of this interface's egress."""
        new = {"rate_bps": rate_bps, "latency_s": latency_s, "jitter_s": jitter_s, "loss": loss,
               "queue_packets": queue_packets}
        if self.applied and new == self.shape:
            return
        for cmd in self.tc_commands(**new):
            self._run(cmd)
        self.shape = new
        self.leaf = "netem" if self.netem and (latency_s > 0 or jitter_s > 0 or loss > 0) else "pfifo"
        self.applied = True

    def tc_commands(self, *, rate_bps: float | None, latency_s: float, jitter_s: float, loss: float,
                    queue_packets: int) -> list[list[str]]:
        """The tc commands that take this interface from its current state to the requested one."""
        dev = ["dev", self.name]
        use_netem = self.netem and (latency_s > 0 or jitter_s > 0 or loss > 0)
        if rate_bps is None and not use_netem:
            # unshaped: back to the kernel default root qdisc (ignore "no qdisc" on a fresh intf)
            return [["tc", "qdisc", "del", *dev, "root", "?"]] if self.applied else []
        cmds: list[list[str]] = []
        if rate_bps is not None:
            rate = max(int(round(rate_bps)), 8)
            pkt = self.mtu + ETH_OVERHEAD
            burst = max(2 * pkt, int(rate / 8 * BURST_WALL_S))
            had_htb = self.applied and self.shape.get("rate_bps") is not None
            if self.applied and not had_htb:
                cmds.append(["tc", "qdisc", "del", *dev, "root", "?"])
            if not had_htb:  # HTB cannot "change" its qdisc; its class can
                cmds.append(["tc", "qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "1"])
            cmds.append(["tc", "class", "replace", *dev, "parent", "1:", "classid", "1:1", "htb",
                         "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", str(burst), "cburst", str(burst),
                         "quantum", str(pkt)])
            parent = ["parent", "1:1", "handle", "10:"]
            kept_leaf = had_htb
        else:
            if self.applied and self.shape.get("rate_bps") is not None:
                cmds.append(["tc", "qdisc", "del", *dev, "root", "?"])
            parent = ["root", "handle", "10:"]
            kept_leaf = self.applied and self.shape.get("rate_bps") is None and self.leaf == "netem"
        leaf = "netem" if use_netem else "pfifo"
        if kept_leaf and self.leaf != leaf:  # a qdisc cannot change its kind in place
            cmds.append(["tc", "qdisc", "del", *dev, *parent[:-2], "?"])
        if use_netem:
            limit = queue_packets + self._in_flight_packets(rate_bps, latency_s + jitter_s)
            netem = ["netem", "limit", str(limit)]
            if latency_s > 0 or jitter_s > 0:
                netem += ["delay", f"{latency_s * 1e6:.3f}us"]
                if jitter_s > 0:
                    # with a rate, netem sends no packet before the previous one (in order, like
                    # the fallback delayer); HTB above does the real shaping
                    netem += [f"{jitter_s * 1e6:.3f}us", "rate", f"{NETEM_ORDER_RATE}bit"]
            if loss > 0:
                netem += ["loss", "random", f"{loss * 100:.6f}%"]
            cmds.append(["tc", "qdisc", "replace", *dev, *parent, *netem])
        else:
            cmds.append(["tc", "qdisc", "replace", *dev, *parent, "pfifo", "limit", str(queue_packets)])
        return cmds

    def _in_flight_packets(self, rate_bps: float | None, delay_s: float) -> int:
        """netem holds delayed packets in its own queue: room for a delay's worth at line rate
        (or a generous default when unshaped) on top of the configured queue."""
        if delay_s <= 0:
            return 0
        rate = rate_bps if rate_bps is not None else 10e9
        return int(math.ceil(rate / 8 * delay_s / (self.mtu + ETH_OVERHEAD))) + 1

    def set_admin(self, up: bool) -> None:
        self._run(["ip", "link", "set", "dev", self.name, "up" if up else "down"])

    def _run(self, argv: list[str], check: bool = True) -> str:
        tolerate = "?" in argv
        argv = [a for a in argv if a != "?"]
        out, err, code = self.node.pexec(argv)
        if code != 0 and check and not tolerate:
            raise TcError(f"{' '.join(argv)} (in {self.node.name}) failed: {(err or out).strip()}")
        return out


class ShapedLink(Link):
    """A veth pair whose two ends are :class:`ShapedIntf` with the same parameters.

    ``set_up(False)`` takes the switch end down: the host keeps its address and routes (its
    end only loses carrier), packets in either direction are dropped until ``set_up(True)``.
    """

    def __init__(self, node1: Any, node2: Any, **params: Any) -> None:
        self.name: str | None = params.pop("pdtb_link", None)
        params.setdefault("cls1", ShapedIntf)
        params.setdefault("cls2", ShapedIntf)
        super().__init__(node1, node2, **params)

    @property
    def intfs(self) -> tuple[ShapedIntf, ShapedIntf]:
        return self.intf1, self.intf2

    def far_end(self) -> ShapedIntf:
        """The end whose admin state models the link state: the switch side when there is one."""
        return self.intf1 if isinstance(self.intf1.node, Switch) else self.intf2

    def reshape(self, **shape: Any) -> None:
        for intf in self.intfs:
            intf.reshape(**shape)

    def set_up(self, up: bool) -> None:
        self.far_end().set_admin(up)


class FabricBridge(LinuxBridge):
    """Mininet's LinuxBridge driven by iproute2 instead of brctl (bridge-utils is not needed):
    a plain learning bridge, no STP, no controller."""

    isSetup = False
    """Own flag, so :meth:`setup` runs on the first bridge whatever Node classes came before."""

    @classmethod
    def setup(cls) -> None:
        """Check what the bridge needs (iproute2), not LinuxBridge's brctl, whose absence makes
        Mininet exit the process; warn, as Mininet does, when bridged packets also traverse the
        root namespace's iptables (a FORWARD policy of DROP there would cut the fabric)."""
        if shutil.which("ip") is None:
            raise TcError("FabricBridge needs the `ip` command (iproute2) on PATH")
        Switch.setup()   # Mininet's own checks (mnexec, ifconfig)
        filtered = []
        for table in ("arp", "ip", "ip6"):
            try:
                if Path(f"/proc/sys/net/bridge/bridge-nf-call-{table}tables").read_text().strip() == "1":
                    filtered.append(f"{table}tables")
            except OSError:
                continue
        if filtered:
            warn(f"*** Warning: bridged fabric packets also traverse the root namespace's {', '.join(filtered)} "
                 f"(net.bridge.bridge-nf-call-*=1)\n")

    def start(self, _controllers: Any) -> None:
        self._ip(["link", "add", "name", self.name, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
        for intf in self.intfList():
            if intf.name != "lo":
                self._ip(["link", "set", "dev", intf.name, "master", self.name])
        self._ip(["link", "set", "dev", self.name, "up"])

    def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 (Mininet's signature)
        subprocess.run(["ip", "link", "del", "dev", self.name], capture_output=True)
        Switch.stop(self, deleteIntfs)

    def connected(self) -> bool:
        return True

    def dpctl(self, *args: Any) -> str:
        return self.cmd("bridge", *args)

    def _ip(self, args: list[str]) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise TcError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
