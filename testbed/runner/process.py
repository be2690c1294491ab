"""Process supervision by recorded PID: spawn, watch, stop in order, never by name.

Every daemon runs in its own session/process group so a Ctrl-C in the terminal reaches
only the orchestrator, which then stops the daemons in order. Each spawned PID is written,
with its kernel start time, to a registry file (``RUN_DIR/pids.json`` and a global one that
``pdtb clean`` reads): a PID is only ever signalled while its start time still matches,
so a recycled PID of an unrelated process is never touched. Children also get a parent-death
signal, so they do not outlive an orchestrator that is killed outright.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fabric.cleanup import proc_start_ticks
from testbed.runner.rundir import write_atomically

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
Spawner = Callable[..., "subprocess.Popen[bytes]"]


def same_process(pid: int, start_ticks: int | None) -> bool:
    """True if ``pid`` is alive and is the process we recorded (not a recycled PID)."""
    now = proc_start_ticks(pid)
    if now is None:
        return False
    if _is_zombie(pid):
        return False
    return start_ticks is None or now == start_ticks


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X")


def die_with_parent() -> None:
    """Runs in the child before exec: die with SIGTERM when the orchestrator dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except OSError:
        pass


class PidRegistry:
    """A JSON file of the processes a run started: ``{"run_dir", "processes": [{name, pid, pgid, start_ticks,
    argv, running, returncode}]}``. Stopped processes stay listed (``running: false``) as the run's record.

    Rewritten atomically on every change so a reader never sees half a file. ``record``, when
    given, is also called with ``(pid, what)`` for every new process: the global registry that
    ``pdtb clean`` reads (``fabric.cleanup.PidRegistry(prefix).record``).
    """

    def __init__(self, paths: Iterable[Path], run_dir: Path | None = None,
                 record: Callable[[int, str], None] | None = None):
        self.paths = [Path(p) for p in paths]
        self.run_dir = run_dir
        self._record = record
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, pid: int, argv: Sequence[str], pgid: int | None = None) -> None:
        with self._lock:
            key = f"{name}:{pid}"
            self._entries[key] = {"name": name, "pid": pid, "pgid": pgid, "start_ticks": proc_start_ticks(pid),
                                  "argv": [str(a) for a in argv][:8], "running": True, "returncode": None}
            self._write()
        if self._record is not None:
            try:
                self._record(pid, name)
            except OSError as exc:  # e.g. /run not writable without root: the run dir still has it
                log.warning("cannot record pid %d for pdtb clean: %s", pid, exc)

    def stopped(self, name: str, pid: int, returncode: int | None) -> None:
        with self._lock:
            entry = self._entries.get(f"{name}:{pid}")
            if entry is not None:
                entry.update(running=False, returncode=returncode)
                self._write()

    def prune(self) -> None:
        """Mark entries whose process is gone as stopped (a survivor stays ``running`` for ``pdtb clean``)."""
        with self._lock:
            for e in self._entries.values():
                if e["running"] and not same_process(e["pid"], e["start_ticks"]):
                    e["running"] = False
            self._write()

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries.values())

    def _write(self) -> None:
        data = {"run_dir": str(self.run_dir) if self.run_dir else None, "owner_pid": os.getpid(),
                "processes": list(self._entries.values())}
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(data, indent=1))


def read_registry(path: Path) -> list[dict[str, Any]]:
    """Entries of a registry file; an unreadable file is treated as empty."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    procs = data.get("processes", []) if isinstance(data, dict) else []
    return [p for p in procs if isinstance(p, dict) and isinstance(p.get("pid"), int) and p["pid"] > 1
            and p.get("running", True)]


def kill_recorded(entries: Iterable[dict[str, Any]], grace_s: float = 3.0) -> list[int]:
    """SIGTERM then SIGKILL every still-matching recorded process (and its group). Returns the PIDs signalled."""
    targets = [e for e in entries if same_process(e["pid"], e.get("start_ticks"))]
    for e in targets:
        _signal(e["pid"], e.get("pgid"), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(same_process(e["pid"], e.get("start_ticks")) for e in targets):
        time.sleep(0.05)
    for e in targets:
        if same_process(e["pid"], e.get("start_ticks")):
            _signal(e["pid"], e.get("pgid"), signal.SIGKILL)
    return [e["pid"] for e in targets]


def _signal(pid: int, pgid: int | None, sig: int) -> None:
    """Signal a process group we created (pgid == pid), else the single process."""
    try:
        if pgid is not None and pgid == pid and os.getpgid(pid) == pgid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Managed:
    """One supervised process."""

    name: str
    popen: "subprocess.Popen[bytes]"
    argv: list[str]
    log_path: Path | None
    pgid: int | None
    start_ticks: int | None
    expected_exit: bool = False  # stopping it, or a crash fault: its exit is not a failure
    reported: bool = False
    started_wall: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None


class Supervisor:
    """Starts processes, records their PIDs, reports unexpected exits, stops them in reverse order."""

    def __init__(self, registry: PidRegistry):
        self.registry = registry
        self.procs: dict[str, Managed] = {}

    def spawn(self, name: str, argv: Sequence[str], *, log_path: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              spawner: Spawner | None = None) -> Managed:
        """Start ``argv`` in a new session, output to ``log_path``.

        ``spawner(argv, **popen_kwargs)`` replaces ``subprocess.Popen`` (e.g. a Mininet host's
        popen, which enters the host's namespace and makes its own session via ``mnexec -d``).
        """
        if name in self.procs and self.procs[name].running():
            raise RuntimeError(f"process {name!r} is already running (pid {self.procs[name].pid})")
        argv = [str(a) for a in argv]
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")
        kw: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=die_with_parent)
        if env is not None:
            kw["env"] = env
        if cwd is not None:
            kw["cwd"] = str(cwd)
        try:
            if spawner is None:
                popen = subprocess.Popen(argv, start_new_session=True, **kw)
            else:
                popen = spawner(argv, **kw)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            pgid = os.getpgid(popen.pid)
        except ProcessLookupError:
            pgid = None
        if pgid != popen.pid:
            pgid = None  # not a group of our own: signal only the process
        managed = Managed(name=name, popen=popen, argv=argv, log_path=log_path, pgid=pgid,
                          start_ticks=proc_start_ticks(popen.pid))
        self.procs[name] = managed
        self.registry.add(name, popen.pid, argv, pgid)
        log.info("started %s pid %d: %s", name, popen.pid, " ".join(argv))
        return managed

    def get(self, name: str) -> Managed:
        return self.procs[name]

    def unexpected_exits(self) -> list[Managed]:
        """Processes that exited since the last call without being asked to (each reported once)."""
        out = []
        for m in self.procs.values():
            if not m.reported and not m.expected_exit and m.poll() is not None:
                m.reported = True
                out.append(m)
        return out

    def stop(self, name: str, grace_s: float = 5.0) -> int | None:
        """SIGTERM the process (group), SIGKILL after ``grace_s``; returns its exit status."""
        m = self.procs.get(name)
        if m is None:
            return None
        m.expected_exit = True
        if m.poll() is None:
            _signal(m.pid, m.pgid, signal.SIGTERM)
            try:
                m.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s: SIGKILL", name, m.pid, grace_s)
                _signal(m.pid, m.pgid, signal.SIGKILL)
                try:
                    m.popen.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.error("%s (pid %d) did not die after SIGKILL", name, m.pid)
                    return None
            # members of its group that outlived the leader (rare: daemons do not fork); only right
            # after the leader died, so the group id cannot have been recycled meanwhile
            if m.pgid is not None:
                try:
                    os.killpg(m.pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.registry.stopped(name, m.pid, m.poll())
        return m.poll()

    def stop_all(self, order: Sequence[str] | None = None, grace_s: float = 5.0) -> None:
        """Stop the named processes in ``order`` first, then the rest in reverse start order."""
        names = [n for n in (order or []) if n in self.procs]
        names += [n for n in reversed(list(self.procs)) if n not in names]
        for name in names:
            self.stop(name, grace_s)

    def stop_group(self, names: Sequence[str], grace_s: float = 5.0) -> None:
        """Stop several processes in parallel: SIGTERM all, wait, SIGKILL the stragglers."""
        live = [self.procs[n] for n in names if n in self.procs]
        for m in live:
            m.expected_exit = True
            if m.poll() is None:
                _signal(m.pid, m.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(m.poll() is None for m in live):
            time.sleep(0.02)
        for m in live:
            self.stop(m.name, grace_s)
