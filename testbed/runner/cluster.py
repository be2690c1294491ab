"""The mininet-cluster backend: one emulated fabric spread over several servers, on Mininet's
cluster edition (``mininet.examples.cluster``).

:class:`ClusterFabricNet` is :class:`fabric.net.FabricNet` with ``MininetCluster`` below it: the
same topology, address plan, shaped links (``ShapedIntf`` at both ends), rto_min, captures and
prefix/PID teardown, but each topology host is a ``RemoteHost`` on the server the placement
gives it, and each link whose two ends sit on different servers is a Mininet ``RemoteLink``
tunnel (ssh Ethernet tunnel or gretap) whose two ends are shaped exactly like a veth's. Every
switch and the root namespace stay on ``localhost`` (``servers[0]``), so the router URL and the
broker work as on one machine. What crosses a tunnel, and what that does to fidelity, is in
docs/cluster.md: each tunnel's measured capacity bounds the dilated rate across servers, so it
enters the choice of TDF (``capacity_bound``) and the fidelity verdict.

Remote processes (host shells, daemons) are recorded on their own server, in
``/run/pdtb/<prefix>/remote-pids`` (PID and kernel start time), and teardown there signals only
those PIDs while their start time matches, and deletes only interfaces carrying the prefix.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from mininet.examples.cluster import (MininetCluster, Placer, RemoteGRELink, RemoteHost, RemoteSSHLink,
                                      SwitchBinPlacer)
from mininet.node import Node

from core.config import ConfigError
from core.vocab import NETWORKS
from fabric.fidelity import FidelityMonitor, parse_qdiscs, read_cpu_times, read_qdiscs
from fabric.link import ShapedLink
from fabric.net import FabricError, FabricNet
from fabric.shaping import check_prefix
from testbed.config.scenario import HEAD_SERVER, ClusterSpec
from testbed.runner.backend import NodePlan
from testbed.runner.mininet import MininetBackend

REMOTE_REGISTRY = "/run/pdtb/{prefix}/remote-pids"
"""On each remote server: one line per process started there, ``PID START_TICKS NAME``."""
TAP_BASE = 4000
"""ssh ``-w`` tunnel device numbers start here (``tap4000`` ...), each tunnel its own pair;
Mininet's own ``makeTunnel`` hard-wires ``tap9``, which two tunnels on one kernel cannot share."""
TUNNEL_WAIT_S = 15.0
TUNNEL_CAPACITY_CACHE = Path("/var/cache/pdtb/tunnel_capacity.json")


# ------------------------------------------------------------------ placement and commands
def resolve_server(server: str) -> str:
    """The IPv4 address Mininet's cluster code connects to (``localhost``: 127.0.0.1)."""
    if server == HEAD_SERVER:
        return "127.0.0.1"
    try:
        infos = socket.getaddrinfo(server, None, socket.AF_INET)
    except socket.gaierror as exc:
        raise ConfigError("emulation.cluster.servers", [("", f"cannot resolve {server!r}: {exc}")]) from None
    return str(infos[0][4][0])


def place_hosts(cluster: ClusterSpec, hosts: Sequence[str]) -> dict[str, str]:
    """topology host -> server: ``placement`` where given, the others in topology order into
    even bins over the servers (Mininet's ``SwitchBinPlacer.bin``: contiguous, sizes differ by
    at most one), so neighbours in the topology file share a server."""
    fixed = {h: s for h, s in cluster.placement.items() if h in hosts}
    rest = [h for h in hosts if h not in fixed]
    return {**SwitchBinPlacer.bin(rest, list(cluster.servers)), **fixed}


def ssh_options(cluster: ClusterSpec) -> list[str]:
    """Options every ssh to a server gets (validated values only: see ``ClusterSpec``)."""
    opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(cluster.ssh_port)]
    if cluster.identity_file:
        opts += ["-i", cluster.identity_file, "-o", "IdentitiesOnly=yes"]
    if cluster.known_hosts_file:
        opts += ["-o", f"UserKnownHostsFile={cluster.known_hosts_file}", "-o", "StrictHostKeyChecking=yes"]
    return opts


def ssh_argv(cluster: ClusterSpec, server: str, remote: Sequence[str]) -> list[str]:
    """``ssh ... user@server 'quoted remote argv'`` (every word quoted: ssh joins them for a shell)."""
    dest = f"{cluster.user}@{resolve_server(server)}"
    return ["ssh", *ssh_options(cluster), dest, " ".join(shlex.quote(str(a)) for a in remote)]


def tunnel_argv(cluster: ClusterSpec, server: str, local_tap: int, remote_tap: int) -> list[str]:
    """The ssh Ethernet tunnel between ``tap<local_tap>`` here and ``tap<remote_tap>`` on ``server``;
    it prints ``@`` once up (Mininet's handshake) and holds the tunnel until killed."""
    dest = f"{cluster.user}@{resolve_server(server)}"
    return ["ssh", "-n", *ssh_options(cluster), "-o", "Tunnel=ethernet", "-o", "ExitOnForwardFailure=yes",
            "-w", f"{local_tap}:{remote_tap}", dest, "echo @"]


_TOKEN = re.compile(r"^[0-9a-f]{12}$")


def remote_record_argv(prefix: str, argv: Sequence[str], name: str, token: str = "-") -> list[str]:
    """``argv`` wrapped so that, on its server, its PID, start time and ``token`` are appended to
    the prefix's remote registry before it execs (the PID is the process's own: exec keeps it)."""
    path = REMOTE_REGISTRY.format(prefix=check_prefix(prefix))
    if token != "-" and not _TOKEN.match(token):
        raise ValueError(f"token must be 12 hex digits, got {token!r}")
    script = (f'mkdir -p "$(dirname {path})"; '
              f'echo "$$ $(cut -d" " -f22 /proc/$$/stat) {token} {shlex.quote(name)}" >> {path}; exec "$@"')
    return ["sh", "-c", script, "pdtb", *[str(a) for a in argv]]


def remote_signal_argv(prefix: str, token: str, sig: int) -> list[str]:
    """The command that, on a server, signals the process recorded with ``token`` while its start
    time still matches (what ``terminate()``/``kill()`` of a remote popen run there)."""
    path = REMOTE_REGISTRY.format(prefix=check_prefix(prefix))
    if not _TOKEN.match(token):
        raise ValueError(f"token must be 12 hex digits, got {token!r}")
    script = (f"set -- $(awk -v t={token} '$3 == t {{print $1, $2}}' {path} 2>/dev/null); "
              f'[ -n "$1" ] && [ "$(cut -d" " -f22 /proc/$1/stat 2>/dev/null)" = "$2" ] && kill -{int(sig)} "$1"; true')
    return ["sh", "-c", script]


REMOTE_CLEAN = r'''
import os, re, signal, sys, time, subprocess
prefix, path = sys.argv[1], sys.argv[2]
def ticks(pid):
    try:
        s = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    f = s[s.rfind(")") + 2:].split()
    return None if f[0] in ("Z", "X") else f[19]
entries = []
try:
    for line in open(path):
        p = line.split()
        if len(p) >= 2 and p[0].isdigit():
            entries.append((int(p[0]), p[1]))
except OSError:
    pass
alive = [(pid, t) for pid, t in entries if ticks(pid) == t]
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, t in alive:
        if ticks(pid) == t:
            try: os.kill(pid, sig)
            except OSError: pass
    deadline = time.time() + 3
    while time.time() < deadline and any(ticks(p) == t for p, t in alive):
        time.sleep(0.05)
out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
gone = []
for line in out.splitlines():
    parts = line.split(":", 2)
    name = parts[1].strip().split("@", 1)[0] if len(parts) > 1 else ""
    if re.fullmatch(re.escape(prefix) + r"[a-z][a-z0-9]*(-[a-z0-9]+)?", name):
        subprocess.run(["ip", "link", "del", "dev", name], capture_output=True)
        gone.append(name)
left = [pid for pid, t in alive if ticks(pid) == t]
try:
    os.unlink(path)
except OSError:
    pass
print(len(alive), " ".join(gone) or "-", " ".join(map(str, left)) or "-")
'''


def clean_server(cluster: ClusterSpec, server: str, prefix: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Stop the processes recorded in ``server``'s remote registry (start times checked) and delete
    the interfaces carrying ``prefix`` there. Returns what it did; raises FabricError if the ssh
    fails or a recorded process survived."""
    path = REMOTE_REGISTRY.format(prefix=check_prefix(prefix))
    argv = ssh_argv(cluster, server, ["python3", "-c", REMOTE_CLEAN, prefix, path])
    return _cleaned(server, subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s))


def clean_this_server(prefix: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """:func:`clean_server` on this machine, without ssh, where a cluster run that used it as a
    server (``localhost`` among the servers, or ``pdtb clean`` run on a remote server) left a
    remote registry: what `pdtb clean --prefix` adds after a run killed before its teardown.
    None where there is no registry."""
    path = REMOTE_REGISTRY.format(prefix=check_prefix(prefix))
    if not os.path.exists(path):
        return None
    return _cleaned("this machine", subprocess.run([sys.executable, "-c", REMOTE_CLEAN, prefix, path],
                                                   capture_output=True, text=True, timeout=timeout_s))


def _cleaned(server: str, proc: subprocess.CompletedProcess) -> dict[str, Any]:
    if proc.returncode != 0:
        raise FabricError(f"cleaning {server} failed (exit {proc.returncode}): {proc.stderr.strip()[:300]}")
    killed, links, left = (proc.stdout.strip().splitlines() or ["0 - -"])[-1].split(" ", 2)
    report = {"server": server, "signalled": int(killed), "links_deleted": [] if links == "-" else links.split(),
              "left": [] if left == "-" else left.split()}
    if report["left"]:
        raise FabricError(f"{server}: recorded processes {report['left']} survived SIGKILL")
    return report


# ------------------------------------------------------------------ Mininet cluster classes
class PdtbRemoteHost(RemoteHost):
    """Mininet's ``RemoteHost`` with the run's ssh options, every remote word quoted (ssh
    joins argv into a shell line), and each remote process recorded on its server."""

    def __init__(self, name: str, *, ssh_opts: Sequence[str] = (), prefix: str = "pt", **kwargs: Any) -> None:
        self.sshbase = ["ssh", "-q", *ssh_opts, "-tt"]
        self.pdtb_prefix = check_prefix(prefix)
        super().__init__(name, **kwargs)

    @staticmethod
    def _ignoreSignal() -> None:  # noqa: N802 (Mininet's name, called as the ssh client's preexec_fn)
        """Mininet's own (a process group of its own, so the run's Ctrl-C does not reach the ssh
        client), and SIGHUP back to its default: an ssh started with SIGHUP ignored (a run under
        ``nohup``) keeps it ignored, so teardown's SIGHUP would not end it and Mininet's wait for
        the host's shell would never return."""
        os.setpgrp()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def _popen(self, cmd: Any, sudo: bool = True, tt: bool = True, **params: Any) -> Any:
        if isinstance(cmd, str):
            cmd = cmd.split()
        if not getattr(self, "isRemote", False):
            # a host on localhost starts processes as Mininet's Host does: RemoteMixin's setpgrp
            # would make ``mnexec -d`` fork, and the Popen would track a parent that exits at once
            return Node._popen(self, cmd, **params)
        cmd = [shlex.quote(str(c)) for c in cmd]
        return super()._popen(cmd, sudo=sudo, tt=tt, **params)

    def popen(self, *args: Any, **kwargs: Any) -> Any:
        """Mininet's popen; on a remote server the process (a daemon, a delayer, tcpdump, iperf3)
        is recorded in its registry there before it execs, and the environment it needs
        (PYTHONPATH, PYTHONUNBUFFERED, PDTB_*) travels on its command line."""
        if getattr(self, "isRemote", False) and len(args) == 1 and isinstance(args[0], (list, tuple)):
            argv = [str(a) for a in args[0]]
            env = kwargs.pop("env", None) or {}
            keep = [f"{k}={v}" for k, v in env.items()
                    if k in ("PYTHONPATH", "PYTHONUNBUFFERED") or k.startswith("PDTB_")]
            token = secrets.token_hex(6)
            args = (remote_record_argv(self.pdtb_prefix, ["env", *keep, *argv] if keep else argv,
                                       f"{self.name}: {argv[0]}", token),)
            proc = super().popen(*args, **kwargs)
            local_send = proc.send_signal

            def send_signal(sig: int) -> None:
                """Signal the remote process (terminate() and kill() come here), then its ssh client."""
                if proc.poll() is None:
                    try:
                        self.rcmd(remote_signal_argv(self.pdtb_prefix, token, int(sig)))
                    except OSError:
                        pass  # the ssh failed: teardown's registry clean still stops it
                local_send(sig)

            proc.send_signal = send_signal  # type: ignore[method-assign]
            return proc
        return super().popen(*args, **kwargs)

    def record_remote(self, pid: int, what: str) -> None:
        """Record a process of this host's server (a shell, a tunnel end) in its remote registry."""
        path = REMOTE_REGISTRY.format(prefix=self.pdtb_prefix)
        self.rcmd(["sh", "-c", f'mkdir -p "$(dirname {path})"; '
                               f'echo "{int(pid)} $(cut -d" " -f22 /proc/{int(pid)}/stat) {shlex.quote(what)}" '
                               f'>> {path}'])


class ShapedSSHLink(ShapedLink, RemoteSSHLink):
    """A shaped link; across servers, Mininet's ssh Ethernet tunnel, one tap pair per link."""

    cluster: ClusterSpec | None = None
    _next_tap = TAP_BASE

    def makeTunnel(self, node1: Any, node2: Any, intfname1: str, intfname2: str,  # noqa: N802 (Mininet API)
                   addr1: str | None = None, addr2: str | None = None) -> Any:
        """Mininet's ``RemoteLink.makeTunnel`` steps (tap on each side, ``ssh -w``, move, rename)
        with a tap number of its own per tunnel and the run's ssh options."""
        if _server(node2) == HEAD_SERVER:
            return self.makeTunnel(node2, node1, intfname2, intfname1, addr2, addr1)
        if _server(node1) != HEAD_SERVER:
            raise FabricError(f"link {node1}-{node2}: tunnels between two remote servers are not supported; "
                              "place one end on localhost")
        assert self.cluster is not None
        cls = type(self)
        taken = set(os.listdir("/sys/class/net"))  # a tap another tunnel (or a crashed one) holds here
        while {f"tap{cls._next_tap}", f"tap{cls._next_tap + 1}"} & taken:
            cls._next_tap += 2
        a, b = cls._next_tap, cls._next_tap + 1
        cls._next_tap += 2
        for node, tap in ((node1, a), (node2, b)):
            out = _root_cmd(node, ["ip", "tuntap", "add", "dev", f"tap{tap}", "mode", "tap"])
            if out.strip():
                raise FabricError(f"creating tap{tap} on {_server(node)} failed: {out.strip()}")
        argv = tunnel_argv(self.cluster, node2.server, a, b)
        self.cmd = argv
        tunnel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        first = tunnel.stdout.read(1) if tunnel.stdout is not None else b""
        if first != b"@":
            tunnel.kill()
            err = tunnel.stderr.read().decode(errors="replace") if tunnel.stderr is not None else ""
            for node, tap in ((node1, a), (node2, b)):
                _root_cmd(node, ["ip", "link", "del", f"tap{tap}"])
            raise FabricError(f"ssh tunnel to {node2.server} did not come up ({' '.join(argv)}): {err.strip()[:300]}")
        for node, tap, name, addr in ((node1, a, intfname1, addr1), (node2, b, intfname2, addr2)):
            if node.inNamespace:
                out = _root_cmd(node, ["ip", "link", "set", f"tap{tap}", "netns", str(node.pid)])
                if out.strip():
                    raise FabricError(f"moving tap{tap} into {node.name} on {_server(node)} failed: {out.strip()}")
            cmd = f"ip link set tap{tap} name {name}" + (f" address {addr}" if addr else "")
            out = node.cmd(cmd)
            if out.strip():
                raise FabricError(f"renaming tap{tap} to {name} on {_server(node)} failed: {out.strip()}")
        return tunnel


def _server(node: Any) -> str:
    """The server a Mininet node runs on (local node classes have no ``server``: localhost)."""
    return getattr(node, "server", None) or HEAD_SERVER


def _root_cmd(node: Any, argv: list[str]) -> str:
    """``argv`` in the root namespace of ``node``'s server; its output (empty on success)."""
    if getattr(node, "isRemote", False):
        return node.rcmd(argv)
    proc = subprocess.run(argv, capture_output=True, text=True)
    return proc.stdout + proc.stderr


GRE_OVERHEAD_BYTES = 38
"""gretap's encapsulation (outer IPv4 20 + GRE with key 8 + inner Ethernet 14 - 4 of the key-less
header Mininet's 1450 assumes): the servers' network must carry the link's MTU plus this."""


def gre_commands(name: str, local_ip: str, remote_ip: str, key: int, mac: str | None) -> list[list[str]]:
    """The root-namespace commands that make one end of a gretap tunnel (Mininet's
    ``RemoteGRELink.makeTunnel`` steps, as argv lists)."""
    cmds = [["ip", "link", "add", "name", name, "type", "gretap", "local", local_ip, "remote", remote_ip,
             "ttl", "64", "key", str(int(key))]]
    if mac:
        cmds.append(["ip", "link", "set", name, "address", mac])
    cmds.append(["ip", "link", "set", "dev", name, "up"])
    return cmds


class ShapedGRELink(ShapedLink, RemoteGRELink):
    """A shaped link; across servers, Mininet's gretap tunnel (needs the ip_gre module). The
    gretap devices keep the link's MTU (ShapedIntf sets it): the servers' network must carry
    ``mtu + GRE_OVERHEAD_BYTES``, or large frames are fragmented or dropped there."""

    cluster: ClusterSpec | None = None

    def makeTunnel(self, node1: Any, node2: Any, intfname1: str, intfname2: str,  # noqa: N802 (Mininet API)
                   addr1: str | None = None, addr2: str | None = None) -> None:
        """Mininet's steps (a gretap device on each server with a shared key, moved into its host),
        run in each server's root namespace whatever the node class (bridges have no ``rcmd``)."""
        if _server(node2) == HEAD_SERVER:
            return self.makeTunnel(node2, node1, intfname2, intfname1, addr2, addr1)
        ip2 = resolve_server(_server(node2))
        route = subprocess.run(["ip", "-o", "route", "get", ip2], capture_output=True, text=True).stdout.split()
        ip1 = route[route.index("src") + 1] if "src" in route else resolve_server(_server(node1))
        RemoteGRELink.GRE_KEY += 1
        key = RemoteGRELink.GRE_KEY
        for node, name, addr, local, remote in ((node1, intfname1, addr1, ip1, ip2), (node2, intfname2, addr2, ip2, ip1)):
            for argv in gre_commands(name, local, remote, key, addr):
                out = _root_cmd(node, argv)
                if out.strip():
                    raise FabricError(f"{' '.join(argv)} on {_server(node)} failed: {out.strip()}")
            if node.inNamespace:
                out = _root_cmd(node, ["ip", "link", "set", name, "netns", str(node.pid)])
                if out.strip():
                    raise FabricError(f"moving {name} into {node.name} on {_server(node)} failed: {out.strip()}")
        return None  # Mininet's makeIntfPair marks the link as tunnelled (self.tunnel = 1)


def link_class(cluster: ClusterSpec) -> type[ShapedLink]:
    """A ShapedLink class bound to this run's cluster settings (ssh options for the tunnels)."""
    base = ShapedSSHLink if cluster.tunnel == "ssh" else ShapedGRELink
    return type(f"Pdtb{base.__name__}", (base,), {"cluster": cluster})


class FixedPlacer(Placer):
    """A Mininet ``Placer`` that returns a precomputed placement (``place_hosts``); everything
    not placed (switches, the root namespace) runs on localhost."""

    def __init__(self, mapping: Mapping[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mapping = dict(mapping)

    def place(self, node: str) -> str:
        return self.mapping.get(node, HEAD_SERVER)


class _ClusterBase(MininetCluster):
    """MininetCluster's constructor, fed from the ClusterFabricNet's settings (FabricNet calls
    ``super().__init__`` with the plain Mininet arguments); its precheck raises instead of exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        spec: ClusterSpec = self.cluster_spec  # type: ignore[attr-defined]
        mapping = self.node_placement  # type: ignore[attr-defined]
        kwargs.update(servers=list(spec.servers), user=spec.user, precheck=True,
                      serverIP={s: resolve_server(s) for s in spec.servers},
                      placement=lambda **kw: FixedPlacer(mapping, **kw))
        super().__init__(*args, **kwargs)

    def precheck(self) -> None:
        """Every remote server answers ssh and runs ``sudo true`` (Mininet's check), else FabricError."""
        spec: ClusterSpec = self.cluster_spec  # type: ignore[attr-defined]
        for server in spec.servers[1:]:
            proc = subprocess.run(ssh_argv(spec, server, ["sudo", "-n", "true"]), capture_output=True, text=True,
                                  timeout=30)
            if proc.returncode != 0:
                raise FabricError(f"server {server}: `ssh {spec.user}@{server} sudo -n true` failed "
                                  f"(exit {proc.returncode}): {proc.stderr.strip()[:300]}")


class ClusterFabricNet(FabricNet, _ClusterBase):
    """A FabricNet whose hosts live on the cluster's servers (see the module docstring)."""

    def __init__(self, topo: Any, *, cluster: ClusterSpec, **kwargs: Any) -> None:
        from fabric.topology import TopologyConfig, load_topology

        topology = topo if isinstance(topo, TopologyConfig) else load_topology(topo)
        self.cluster_spec = cluster
        self.node_placement_by_host = place_hosts(cluster, [h.name for h in topology.hosts])
        prefix = check_prefix(kwargs.get("prefix", "pt"))
        self.node_placement = {f"{prefix}{h}": s for h, s in self.node_placement_by_host.items()}
        self.servers_used = sorted(set(self.node_placement_by_host.values()) - {HEAD_SERVER})
        self.clean_reports: list[dict[str, Any]] = []
        self.tunnel_bound_bps: float | None = None
        super().__init__(topology, **kwargs)
        opts = ssh_options(cluster)
        lcls = link_class(cluster)
        for name in self.fabric_topo.hosts():
            info = self.fabric_topo.nodeInfo(name)
            if name in self.node_placement:
                info.update(cls=PdtbRemoteHost, ssh_opts=opts, prefix=self.prefix, user=cluster.user)
        for _a, _b, info in self.fabric_topo.links(sort=False, withKeys=False, withInfo=True):
            info["cls"] = lcls
        self.tunnel_links: list[str] = [
            lk.name for lk in self.plan.links
            if len({self.server_of(e) for e in (lk.a, lk.b)}) > 1]

    def links_over(self, bps: float, classes: tuple[str, ...] = NETWORKS) -> list[str]:
        """Tunnelled links of ``classes`` whose emulated rate is above ``bps`` (unshaped counts as above)."""
        cls = {lk.name: lk.cls for lk in self.plan.links}
        return [n for n in self.tunnel_links
                if cls[n] in classes and (self._emulated(n).get("rate_bps") or float("inf")) > bps]

    def server_of(self, name: str) -> str:
        """The server of a topology host (switches and the root namespace: localhost)."""
        return self.node_placement_by_host.get(name, HEAD_SERVER)

    def addHost(self, name: str, cls: Any = None, **params: Any) -> Node:  # noqa: N802 (Mininet API)
        node = super(FabricNet, self).addHost(name, cls=cls, **params)
        if getattr(node, "isRemote", False):
            node.record_remote(node.pid, f"shell {name}")
        else:
            self.registry.record(node.pid, f"shell {name}")
        return node

    def start(self) -> None:
        """Remove what a crashed run of this prefix left on the remote servers (their registries
        and prefixed interfaces: the local leftovers were refused in the constructor), then build."""
        if self._started:
            return
        for server in self.servers_used:
            clean_server(self.cluster_spec, server, self.prefix)
        super().start()
        if self.impairment_backend == "fallback" and self.servers_used:
            self.fidelity_notes.append(
                "fallback impairments on remote hosts: each delayer's control socket lives in a temp dir "
                "on localhost, which a remote delayer reaches only when the servers share /tmp (one "
                "machine); give real servers a kernel with sch_netem (docs/cluster.md)")
        for link in self.links:
            tunnel = getattr(link, "tunnel", None)
            if isinstance(tunnel, subprocess.Popen):
                self.registry.record(tunnel.pid, f"ssh tunnel {getattr(link, 'name', '?')}")

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out["cluster"] = {"servers": list(self.cluster_spec.servers), "tunnel": self.cluster_spec.tunnel,
                          "placement": dict(self.node_placement_by_host), "tunnel_links": list(self.tunnel_links)}
        return out

    def stop(self) -> None:
        """FabricNet's teardown here, then each remote server's by its registry and the prefix."""
        problems: list[str] = []
        try:
            super().stop()
        except FabricError as exc:
            problems.append(str(exc))
        for server in self.servers_used:
            try:
                self.clean_reports.append(clean_server(self.cluster_spec, server, self.prefix))
            except (FabricError, OSError, subprocess.SubprocessError) as exc:
                problems.append(f"{server}: {exc}")
        if problems:
            raise FabricError("; ".join(problems))


# ------------------------------------------------------------------ a second server on this machine
class LoopbackServer:
    """An sshd on a loopback address (default 127.0.0.2, a free port) with its own host key and
    an authorized client key in ``workdir``, tunnels permitted: a second "server" on one machine,
    for the tests and benchmarks/cluster_tunnel.py. Stopped by its recorded PID. Needs root and
    openssh-server (bootstrap.sh installs it)."""

    def __init__(self, workdir: Path, address: str = "127.0.0.2") -> None:
        self.dir, self.address = Path(workdir), address
        self.pid: int | None = None
        self.port = 0

    def start(self) -> "LoopbackServer":
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        for name in ("host", "id"):
            if not (d / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
        (d / "authorized_keys").write_text((d / "id.pub").read_text())
        with socket.socket() as probe:
            probe.bind((self.address, 0))
            self.port = probe.getsockname()[1]
        kind, key = (d / "host.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[{self.address}]:{self.port} {kind} {key}\n")
        (d / "sshd_config").write_text(
            f"ListenAddress {self.address}:{self.port}\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitTunnel ethernet\nUsePAM no\n"
            f"StrictModes no\nUseDNS no\nPidFile {d / 'sshd.pid'}\n")
        (d / "sshd.pid").unlink(missing_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True)
        deadline = time.monotonic() + 10
        while not (d / "sshd.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not (d / "sshd.pid").exists():
            raise FabricError(f"sshd on {self.address}:{self.port} did not start: "
                              f"{(d / 'sshd.log').read_text()[-500:]}")
        self.pid = int((d / "sshd.pid").read_text())
        return self

    def cluster(self, **extra: Any) -> ClusterSpec:
        """A ClusterSpec of localhost and this server, with its key files."""
        return ClusterSpec.model_validate({"servers": [HEAD_SERVER, self.address], "ssh_port": self.port,
                                           "identity_file": str(self.dir / "id"),
                                           "known_hosts_file": str(self.dir / "known_hosts"), **extra})

    def stop(self) -> None:
        if self.pid is not None:
            import signal

            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.pid = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ------------------------------------------------------------------ tunnel capacity
def measure_tunnel_capacity(cluster: ClusterSpec, prefix: str, duration_s: float = 2.0, runs: int = 2,
                            use_cache: bool = True, cache_path: Path = TUNNEL_CAPACITY_CACHE) -> dict[str, float]:
    """server -> TCP goodput (bit/s) through one shaped, tunnelled link from localhost to a host
    on that server (the calibration topology of ``fabric.dilation`` with ``calb`` placed there);
    the best of ``runs``. Cached per server, tunnel kind and kernel, for a day."""
    from fabric.check import measure_tcp
    from fabric.dilation import calibration_topology

    key = f"{cluster.tunnel}:{cluster.user}@{{server}}:{cluster.ssh_port}"
    cache: dict[str, Any] = {}
    if use_cache:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    out: dict[str, float] = {}
    for server in cluster.servers[1:]:
        entry = cache.get(key.format(server=server))
        if entry and time.time() - entry["measured_at"] < 86400:
            out[server] = float(entry["bps"])
            continue
        spec = cluster.model_copy(update={"placement": {"cala": HEAD_SERVER, "calb": server}})
        net = ClusterFabricNet(calibration_topology(), cluster=spec, prefix=prefix, tdf=1.0, byte_scale=1.0)
        try:
            net.start()
            bps = max(measure_tcp(net, "cala", "calb", "efa", duration_s) for _ in range(max(1, runs)))
        finally:
            net.stop()
        out[server] = bps
        cache[key.format(server=server)] = {"bps": bps, "measured_at": time.time(),
                                            "method": f"best of {runs} iperf3 TCP runs of {duration_s:g} s"}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass
    return out


def tunnel_bound(cluster: ClusterSpec, capacities: Mapping[str, float]) -> tuple[float, str] | None:
    """The smallest tunnel capacity and why it bounds the run (None: a single server)."""
    if cluster.tunnel_capacity != "auto":
        bps = float(cluster.tunnel_capacity)
        return bps, f"tunnel capacity {bps / 1e6:.0f} Mbit/s (emulation.cluster.tunnel_capacity) bounds the links"
    if not capacities:
        return None
    server, bps = min(capacities.items(), key=lambda kv: kv[1])
    return bps, (f"{cluster.tunnel} tunnel to {server} carries {bps / 1e6:.0f} Mbit/s (measured): it bounds "
                 "every link that crosses servers")


def check_hooks(scenario_path: str, prefix: str) -> tuple[Any, Any]:
    """``pdtb fabric check --cluster SCENARIO``: a net factory placing hosts on the scenario's
    servers, and a bound measuring its tunnels afresh (the cache is refreshed for runs)."""
    from testbed.config.scenario import load_scenario

    spec = _spec(load_scenario(scenario_path).emulation)

    def factory(topology: Any, **kwargs: Any) -> ClusterFabricNet:
        return ClusterFabricNet(topology, cluster=spec, **kwargs)

    def bound() -> tuple[float, str] | None:
        return tunnel_bound(spec, measure_tunnel_capacity(spec, prefix, use_cache=False))

    return factory, bound


# ------------------------------------------------------------------ the backend
class ClusterBackend(MininetBackend):
    """Mininet's backend on a ``ClusterFabricNet``: the same addresses, spawners, link changes,
    captures and fidelity monitor, with hosts on the servers of ``emulation.cluster``."""

    name = "mininet-cluster"
    emulates_links = True
    link_faults = True

    @classmethod
    def capacity_bound(cls, prefix: str, emulation: Any) -> tuple[float, str] | None:
        spec = _spec(emulation)
        if spec.tunnel_capacity != "auto":
            return tunnel_bound(spec, {})
        return tunnel_bound(spec, measure_tunnel_capacity(spec, prefix))

    def build(self, topo: Any, nodes: Mapping[str, NodePlan], *, tdf: float, byte_scale: float,
              emulation: Any) -> None:
        spec = _spec(emulation)
        self.topo = topo
        rto = emulation.rto_min
        # measured (or read from the cache) before this run's net exists: the probe uses the prefix
        remote = {s for s in place_hosts(spec, [h.name for h in topo.hosts]).values()} - {HEAD_SERVER}
        bound = ClusterBackend.capacity_bound(self.prefix, emulation) if remote else None
        try:
            net = ClusterFabricNet(topo, cluster=spec, tdf=tdf, byte_scale=byte_scale, prefix=self.prefix,
                                   impairment=emulation.impairment,
                                   rto_min_s=None if rto == "auto" else float(rto))
        except FabricError as exc:
            raise ConfigError("mininet-cluster backend", [("", str(exc))]) from None
        self.net = net
        net.start()
        net.tunnel_bound_bps = bound[0] if bound is not None and net.tunnel_links else None
        if net.tunnel_bound_bps is not None:
            over = net.links_over(net.tunnel_bound_bps)
            net.fidelity_notes.append(bound[1] + (f"; links above it: {', '.join(over)}" if over else ""))

    def start_monitor(self, run_dir: Path) -> None:
        """The fidelity monitor, reading each remote namespace's qdiscs on its server."""
        from fabric.fidelity import unmeasured_verdict

        try:
            self.monitor = ClusterFidelityMonitor(self.net, run_dir, 0.5).start()
        except (OSError, RuntimeError, ValueError) as exc:
            self.monitor = None
            reason = f"the fidelity monitor could not start: {type(exc).__name__}: {exc}"
            (Path(run_dir) / "fidelity.json").write_text(json.dumps(unmeasured_verdict(reason), indent=2) + "\n")


def _spec(emulation: Any) -> ClusterSpec:
    spec = getattr(emulation, "cluster", None)
    if spec is None:
        raise ConfigError("emulation.cluster", [("", "the mininet-cluster backend needs emulation.cluster.servers "
                                                     "(docs/cluster.md)")])
    return spec


class ClusterFidelityMonitor(FidelityMonitor):
    """FidelityMonitor whose remote ports are read over ssh on their server (``mnexec -a``),
    and whose verdict names the tunnels and flags a link configured above a tunnel's capacity."""

    def sample(self) -> dict[str, Any]:
        t = time.time()
        groups: dict[tuple[str, int | None], list[Any]] = {}
        for port in self.ports:
            node = port.intf.node
            server = node.server if getattr(node, "isRemote", False) else HEAD_SERVER
            groups.setdefault((server, port.pid), []).append(port)
        ports: dict[str, dict[str, Any]] = {}
        for (server, pid), group in groups.items():
            if server == HEAD_SERVER:
                stats = read_qdiscs(pid)
            else:
                argv = ssh_argv(self.net.cluster_spec, server,
                                ["sudo", "-n", "mnexec", "-a", str(pid), "tc", "-s", "-j", "qdisc", "show"])
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                if proc.returncode != 0:
                    raise OSError(f"tc qdisc show on {server} (pid {pid}) failed: {proc.stderr.strip()[:200]}")
                stats = parse_qdiscs(proc.stdout)
            for port in group:
                if port.name in stats:
                    ports[port.name] = {"link": port.link, "rate_bps": port.rate_bps(), **stats[port.name]}
        return {"t": t, "cpu": [list(c) for c in read_cpu_times()], "ports": ports}

    def stop(self) -> dict[str, Any]:
        verdict = super().stop()
        net = self.net
        bound = net.tunnel_bound_bps
        verdict["tunnels"] = {"links": list(net.tunnel_links), "kind": net.cluster_spec.tunnel,
                              "capacity_bps": bound, "placement": dict(net.node_placement_by_host)}
        if bound is not None:
            # an EFA link runs saturated while a KV cache crosses it: above the tunnel, the tunnel
            # sets the transfer time, not the configured rate. Frontend and mgmt links carry requests,
            # tokens and telemetry far below their rate (as on one machine, where they may exceed the
            # host's cap): a warning, and the backlog check above catches one that backs up.
            over = net.links_over(bound, ("efa",))
            if over:
                verdict["reasons"].append(f"link(s) {', '.join(over)} cross servers at an emulated rate above the "
                                          f"tunnel's {bound / 1e6:.0f} Mbit/s")
                verdict["verdict"], verdict["trustworthy"] = "untrustworthy", False
            light = net.links_over(bound, ("frontend", "mgmt"))
            if light:
                verdict.setdefault("warnings", []).append(
                    f"frontend/mgmt link(s) {', '.join(light)} cross servers at an emulated rate above the tunnel's "
                    f"{bound / 1e6:.0f} Mbit/s (they carry requests, tokens and telemetry only)")
        (self.run_dir / "fidelity.json").write_text(json.dumps(verdict, indent=2) + "\n")
        return verdict
