"""Userspace delay and jitter through NFQUEUE, for kernels without ``sch_netem``.

Packets are held at the RECEIVING side: an iptables rule in the receiving host's namespace
(``-t raw -A PREROUTING -i INTF -j NFQUEUE``) hands them to a delayer process that releases
each verdict (accept) at ``arrival + latency + jitter sample``. Holding them at the sender's
egress instead collapses TCP (the held skbs still belong to the socket, and TCP small queues
stop the sender; the brief measured 4.6 Mbit/s against 1.1 Gbit/s at ingress).

Behaviour (documented in docs/fidelity.md):

- Jitter: each packet's delay is ``latency + U(-jitter, +jitter)``, clamped at 0: the uniform
  distribution netem uses when no distribution table is given.
- Order: packets leave in arrival order (FIFO per queue): a packet's release time is
  ``max(its sample, the previous packet's release time)``. netem reorders on jitter unless
  a rate is set; TCP mistakes reordering for loss, and the emulated EFA (SRD) hides its own
  reordering from the endpoints, so in-order delivery is the faithful default.
- Bound: the kernel queue holds at most ``max_packets`` packets; beyond that the kernel drops
  (tail drop, counted in /proc/net/netfilter/nfnetlink_queue). No ``--queue-bypass``: when the
  delayer dies, traffic on the link stops instead of silently losing its delay.
- GSO: the queue is configured with ``NFQA_CFG_F_GSO`` so GSO super-packets are held whole
  instead of being segmented for userspace (they crossed the veth as one skb anyway), and
  verdicts are released in batches (``NFQNL_MSG_VERDICT_BATCH``: every id up to N), one
  netlink message per release instant. Both keep the delayer above 1 Gbit/s on this machine.
- Timing: delays count from the kernel's receive timestamp (the delayer turns receive
  timestamping on), and timer wake-ups are compensated for their mean lateness; what remains
  is ~0.1 ms per direction of verdict and re-injection cost (docs/fidelity.md).
- Runtime changes: a unix stream socket (JSON lines): ``{"cmd": "set", "latency_s": x,
  "jitter_s": y}`` and ``{"cmd": "stats"}``. Packets already held keep their release time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

WORKDIR_PREFIX = "pdtb-nfq-"
"""A delayer's temp dir is ``<tmp>/pdtb-nfq-<interface>.<random>``: the interface name (which
starts with the fabric's prefix) lets ``fabric.cleanup.clean`` find a crashed run's dirs."""
DEFAULT_MAX_PACKETS = 10000
"""Kernel queue bound: 10000 GSO-or-MTU packets; 1 Gbit/s x 50 ms of 1500-byte packets is 4167."""

_INTF_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_COMMENT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# netlink / nfnetlink_queue constants (linux/netfilter/nfnetlink_queue.h)
_NFNL_SUBSYS_QUEUE = 3
_NFQNL_MSG_CONFIG = 2
_NFQNL_MSG_VERDICT_BATCH = 3
_NFQA_VERDICT_HDR = 2
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQA_CFG_F_GSO = 1 << 2
_NLM_F_REQUEST = 1
_NF_ACCEPT = 1
_SO_TIMESTAMPNS = 35
_MAX_LAG_S = 0.05


class NodeLike(Protocol):
    """The part of a Mininet node the delayer uses: run a command inside its namespace."""

    name: str

    def popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen: ...


class DelayerError(RuntimeError):
    """The delayer could not be started, reached or stopped."""


def _check_params(latency_s: float, jitter_s: float) -> None:
    for name, value in (("latency_s", latency_s), ("jitter_s", jitter_s)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or value > 60:
            raise ValueError(f"{name} must be a number of seconds in [0, 60], got {value!r}")


def _nfnl_message(msg_type: int, queue_num: int, attrs: list[tuple[int, bytes]], seq: int) -> bytes:
    """One nfnetlink_queue request: nlmsghdr + nfgenmsg (AF_UNSPEC, v0, queue) + attributes."""
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue_num)
    for attr_type, payload in attrs:
        length = 4 + len(payload)
        body += struct.pack("=HH", length, attr_type) + payload + b"\0" * (-length % 4)
    header = struct.pack("=IHHII", 16 + len(body), (_NFNL_SUBSYS_QUEUE << 8) | msg_type,
                         _NLM_F_REQUEST, seq, 0)
    return header + body


_EARLY_GAIN = 0.1
_MAX_EARLY_S = 0.0003
"""Wake-up lateness compensation: the loop releases up to 0.3 ms early, learning by how much
its timer wake-ups are late on average (EWMA of the error, each clipped to +-0.3 ms so that a
descheduled moment does not pull later releases early), so that the mean error tends to zero."""


def _raise_priority() -> None:
    """Run as a low real-time priority (SCHED_FIFO 10) so that busy neighbours on a 2-core host
    do not add their time slices to the emulated delay; the kernel's RT throttling still leaves
    others 5 % of each CPU. Falls back to nice -10 where RT scheduling is not allowed."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass


def _set_timer_slack_ns(ns: int) -> None:
    """Ask for precise timer wake-ups (default slack is 50 us)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, ctypes.c_ulong(ns), 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def serve(queue_num: int, latency_s: float, jitter_s: float, control_path: Path,
          max_packets: int, seed: int | None) -> int:
    """Delayer process body: bind the queue, hold packets, release them on time."""
    import select

    from netfilterqueue import COPY_META, NetfilterQueue

    rng = random.Random(seed)
    uniform, monotonic = rng.uniform, time.monotonic
    settings = [latency_s, jitter_s]
    held: deque[tuple[float, int]] = deque()      # (release monotonic time, packet id), FIFO
    append, popleft = held.append, held.popleft
    counters = {"released": 0, "max_held": 0, "late_total_s": 0.0, "late_max_s": 0.0}
    received = 0
    last_release = 0.0
    clock = [time.time() - monotonic(), monotonic() - _MAX_LAG_S]   # realtime offset, oldest credible arrival

    def on_packet(pkt: Any) -> None:
        # the hot path (once per packet): keep it to a few local operations
        nonlocal last_release, received
        stamp = pkt.get_timestamp()     # kernel receive time (realtime), when timestamping is on
        arrival = stamp - clock[0]
        if arrival < clock[1]:
            arrival = monotonic()
        lat, jit = settings
        if jit:
            release = arrival + lat + uniform(-jit, jit)
            if release < arrival:
                release = arrival
        else:
            release = arrival + lat
        if release < last_release:
            release = last_release
        last_release = release
        append((release, pkt.id))
        received += 1

    # SIGTERM/SIGINT wake the select() through this socket (select is restarted after a
    # signal handler returns, so a flag alone would wait for the next packet)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)

    # Any socket asking for receive timestamps makes the kernel stamp every received skb, so
    # NFQUEUE reports the arrival time and the ~0.1 ms queueing to userspace is not added.
    stamp_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stamp_sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=max_packets, mode=COPY_META,
             sock_len=max(8 << 20, max_packets * 1024))
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12, fileno=os.dup(nfq.get_fd()))
    nl.setblocking(False)
    seq = 1
    flags = struct.pack("!I", _NFQA_CFG_F_GSO)
    nl.send(_nfnl_message(_NFQNL_MSG_CONFIG, queue_num, [(_NFQA_CFG_FLAGS, flags), (_NFQA_CFG_MASK, flags)], seq))

    def release_upto(packet_id: int) -> None:
        nonlocal seq
        seq += 1
        msg = _nfnl_message(_NFQNL_MSG_VERDICT_BATCH, queue_num,
                            [(_NFQA_VERDICT_HDR, struct.pack("!II", _NF_ACCEPT, packet_id))], seq)
        while True:
            try:
                nl.send(msg)
                return
            except BlockingIOError:
                select.select([], [nl], [], 0.01)

    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(str(control_path))
    ctl.listen(8)
    ctl.setblocking(False)

    def handle_control() -> None:
        """One request per connection; a misbehaving client never takes the delayer down."""
        try:
            conn, _ = ctl.accept()
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(1.0)
                data = b""
                while not data.endswith(b"\n") and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                try:
                    req = json.loads(data)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                    if req.get("cmd") == "set":
                        lat, jit = float(req["latency_s"]), float(req["jitter_s"])
                        _check_params(lat, jit)
                        settings[:] = [lat, jit]
                    elif req.get("cmd") != "stats":
                        raise ValueError(f"unknown command {req.get('cmd')!r}")
                    reply = {"ok": True, "latency_s": settings[0], "jitter_s": settings[1], "received": received,
                             **counters, "held": len(held)}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                return

    _set_timer_slack_ns(1)
    early = 0.0          # released this much before due: the EWMA of wake-up lateness
    nfd = nl.fileno()
    _raise_priority()
    while True:
        timeout = None if not held else max(0.0, held[0][0] - early - time.monotonic())
        readable, _, _ = select.select([nfd, ctl, wake_r], [], [], timeout)
        if wake_r in readable:
            break
        if nfd in readable:
            now = monotonic()
            clock[:] = [time.time() - now, now - _MAX_LAG_S]
            # reads until the socket is empty (in C: ~3 us per packet here); a flood cannot
            # starve the releases for long, because a full kernel queue stops new messages
            nfq.run(block=False)
            counters["max_held"] = max(counters["max_held"], len(held))
        if ctl in readable:
            handle_control()
        now = monotonic()
        if held and held[0][0] - early <= now:
            first_due = held[0][0]
            miss = min(_MAX_EARLY_S, max(-_MAX_EARLY_S, now - first_due))   # outliers count little
            early = min(_MAX_EARLY_S, max(0.0, early + _EARLY_GAIN * miss))
            n, due_sum, last_id = 0, 0.0, 0
            while held and held[0][0] - early <= now:
                due, last_id = popleft()
                n += 1
                due_sum += due
            release_upto(last_id)
            counters["released"] += n
            counters["late_total_s"] += n * now - due_sum
            counters["late_max_s"] = max(counters["late_max_s"], now - first_due)   # FIFO: the first is latest
    if held:                                        # leave nothing stranded in the kernel
        release_upto(held[-1][1])
        counters["released"] += len(held)
    nfq.unbind()
    stamp_sock.close()
    signal.set_wakeup_fd(-1)
    wake_r.close()
    wake_w.close()
    ctl.close()
    control_path.unlink(missing_ok=True)
    return 0


class Delayer:
    """One delayer process and its iptables rule inside a host's namespace."""

    def __init__(self, host: NodeLike, intf_name: str, queue_num: int, proc: subprocess.Popen,
                 workdir: Path, comment: str, latency_s: float, jitter_s: float,
                 also_intfs: tuple[str, ...] = ()) -> None:
        self.host = host
        self.intf_name = intf_name
        self.also_intfs = tuple(also_intfs)
        self.queue_num = queue_num
        self.proc = proc
        self.workdir = workdir
        self.comment = comment
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self._rule_installed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def control_path(self) -> Path:
        return self.workdir / "ctl.sock"

    @property
    def rule(self) -> list[str]:
        """The iptables rule spec (after ``-A``/``-D``) that feeds the queue from ``intf_name``."""
        return self._rule_for(self.intf_name)

    def _rule_for(self, intf: str) -> list[str]:
        return ["PREROUTING", "-i", intf, "-m", "comment", "--comment", self.comment,
                "-j", "NFQUEUE", "--queue-num", str(self.queue_num)]

    @property
    def intf_names(self) -> tuple[str, ...]:
        """Every interface whose ingress this delayer holds: a host's rails share one delayer
        (they share the link's latency, and one process per rail would crowd a small host)."""
        return (self.intf_name, *self.also_intfs)

    @classmethod
    def start(cls, host: NodeLike, intf_name: str, queue_num: int, latency_s: float,
              jitter_s: float, *, comment: str | None = None, max_packets: int = DEFAULT_MAX_PACKETS,
              seed: int | None = None, timeout_s: float = 10.0, also_intfs: tuple[str, ...] = ()) -> "Delayer":
        """Start the delayer in ``host``'s namespace, wait until it has bound the queue, then
        install the rule (so no packet reaches an unbound queue); ``also_intfs`` feed the same
        queue (the other rails of the host's link)."""
        for name in (intf_name, *also_intfs):
            if not _INTF_RE.match(name):
                raise ValueError(f"interface name {name!r} is not a valid interface name")
        if not (isinstance(queue_num, int) and 0 <= queue_num <= 65535):
            raise ValueError(f"queue_num must be an integer in [0, 65535], got {queue_num!r}")
        _check_params(latency_s, jitter_s)
        if not (isinstance(max_packets, int) and 1 <= max_packets <= 1_000_000):
            raise ValueError(f"max_packets must be an integer in [1, 1000000], got {max_packets!r}")
        comment = comment or f"pdtb-nfq-{intf_name}"
        if not _COMMENT_RE.match(comment):
            raise ValueError(f"iptables comment {comment!r} must match {_COMMENT_RE.pattern}")
        workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{intf_name}."))
        argv = [sys.executable, "-m", "fabric.shaping.nfqdelay", "--queue", str(queue_num),
                "--latency-s", repr(float(latency_s)), "--jitter-s", repr(float(jitter_s)),
                "--control", str(workdir / "ctl.sock"), "--max-packets", str(max_packets)]
        if seed is not None:
            argv += ["--seed", str(seed)]
        log = open(workdir / "delayer.log", "wb")
        try:
            proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self = cls(host, intf_name, queue_num, proc, workdir, comment, float(latency_s), float(jitter_s),
                   tuple(also_intfs))
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise DelayerError(f"delayer for {host.name}:{intf_name} (queue {queue_num}) exited "
                                       f"with {proc.returncode}: {self._log_tail()}")
                if self.control_path.exists():
                    try:
                        self._request({"cmd": "stats"})
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    raise DelayerError(f"delayer for {host.name}:{intf_name} not ready after {timeout_s} s: "
                                       f"{self._log_tail()}")
                time.sleep(0.02)
            self._iptables("-A")
            self._rule_installed = True
        except BaseException:
            self.stop()
            raise
        return self

    def update(self, latency_s: float, jitter_s: float) -> None:
        """Change latency and jitter for packets arriving from now on."""
        _check_params(latency_s, jitter_s)
        reply = self._request({"cmd": "set", "latency_s": float(latency_s), "jitter_s": float(jitter_s)})
        if not reply.get("ok"):
            raise DelayerError(f"delayer {self.host.name}:{self.intf_name} refused update: {reply.get('error')}")
        self.latency_s, self.jitter_s = float(latency_s), float(jitter_s)

    def stats(self) -> dict[str, Any]:
        """Counters from the process: received, released, held, max_held, current settings."""
        return self._request({"cmd": "stats"})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Remove the rule first (new packets pass undelayed), then end the process, which
        releases what it still holds, and remove its directory. Idempotent; the process and
        directory go even when the rule cannot be removed (the error is raised after)."""
        errors = []
        try:
            if self._rule_installed:
                try:
                    self._iptables("-D")
                    self._rule_installed = False
                except (DelayerError, OSError, subprocess.SubprocessError) as exc:
                    errors.append(str(exc))
        finally:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=3)
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise DelayerError("; ".join(errors))

    def _request(self, req: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(str(self.control_path))
            sock.sendall(json.dumps(req).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        if not data:
            raise DelayerError(f"delayer {self.host.name}:{self.intf_name} closed the control socket")
        return json.loads(data)

    def _iptables(self, action: str) -> None:
        problems = []
        for intf in self.intf_names:
            argv = ["iptables", "-w", "5", "-t", "raw", action, *self._rule_for(intf)]
            proc = self.host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = proc.communicate(timeout=15)
            if proc.returncode != 0:
                problems.append(f"{' '.join(argv)} in {self.host.name} failed: "
                                f"{(err or out).decode(errors='replace').strip()}")
        if problems:
            raise DelayerError("; ".join(problems))

    def _log_tail(self) -> str:
        try:
            text = (self.workdir / "delayer.log").read_text(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text[-800:] or "(empty log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric.shaping.nfqdelay",
                                     description="hold NFQUEUE packets for latency +- jitter, in order")
    parser.add_argument("--queue", type=int, required=True)
    parser.add_argument("--latency-s", type=float, required=True)
    parser.add_argument("--jitter-s", type=float, default=0.0)
    parser.add_argument("--control", type=Path, required=True, help="unix socket path for runtime changes")
    parser.add_argument("--max-packets", type=int, default=DEFAULT_MAX_PACKETS)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        _check_params(args.latency_s, args.jitter_s)
    except ValueError as exc:
        parser.error(str(exc))
    return serve(args.queue, args.latency_s, args.jitter_s, args.control, args.max_packets, args.seed)


if __name__ == "__main__":
    sys.exit(main())
