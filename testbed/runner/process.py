"""Process supervision by recorded PID: spawn, watch, stop in order, never by name.

Every daemon runs in its own session/process group so a Ctrl-C in the terminal reaches
only the orchestrator, which then stops the daemons in order. Each spawned PID is recorded with
its kernel start time in the run's ``core.pids.PidRegistry`` (``RUN_DIR/pids.jsonl``) and, as
root, in its prefix's registry that ``pdtb clean`` reads: a PID is only ever signalled while
its start time still matches, so a recycled PID of an unrelated process is never touched.
Children also get a parent-death signal, so they do not outlive an orchestrator that is
killed outright.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from core.pids import PidRegistry, proc_start_ticks, signal_process

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
Spawner = Callable[..., "subprocess.Popen[bytes]"]


def die_with_parent() -> None:
    """Runs in the child before exec: die with SIGTERM when the orchestrator dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except OSError:
        pass


def record_start(registries: Sequence[PidRegistry], name: str, pid: int, argv: Sequence[str],
                 pgid: int | None = None) -> None:
    """Record a started process in every registry (one that cannot be written is logged: the
    run's own registry still has it)."""
    for registry in registries:
        try:
            registry.record(pid, name, pgid=pgid, argv=argv)
        except OSError as exc:
            log.warning("cannot record pid %d in %s: %s", pid, registry.path, exc)


def record_stop(registries: Sequence[PidRegistry], pid: int, returncode: int | None) -> None:
    for registry in registries:
        try:
            registry.stopped(pid, returncode)
        except OSError as exc:
            log.warning("cannot record the end of pid %d in %s: %s", pid, registry.path, exc)


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

    def __init__(self, registries: Sequence[PidRegistry]):
        self.registries = list(registries)
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
        record_start(self.registries, name, popen.pid, argv, pgid)
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
            signal_process(m.pid, m.pgid, signal.SIGTERM)
            try:
                m.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.1f s: SIGKILL", name, m.pid, grace_s)
                signal_process(m.pid, m.pgid, signal.SIGKILL)
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
        record_stop(self.registries, m.pid, m.poll())
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
                signal_process(m.pid, m.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(m.poll() is None for m in live):
            time.sleep(0.02)
        for m in live:
            self.stop(m.name, grace_s)
