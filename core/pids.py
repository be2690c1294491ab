"""The one record of the processes the project started, and the one routine that stops them.

A ``PidRegistry`` is an append-only JSON-lines file: one line when a process starts
(``pid``, ``start_ticks``, ``name``, ``pgid``, ``argv``) and one when it is seen to end
(``pid``, ``start_ticks``, ``returncode``). Each run keeps one in its directory
(``RUN_DIR/pids.jsonl``: what ran and how it ended) and, as root, every process is also recorded
in its prefix's registry (``/run/pdtb/<prefix>/pids.jsonl``), which ``pdtb clean`` reads after a
crash. A PID is only ever signalled while its kernel start time still matches the record, so a
recycled PID of an unrelated process is never touched; nothing is ever killed by name.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REGISTRY_ROOT = Path("/run/pdtb")


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def same_process(pid: int, start_ticks: int | None) -> bool:
    """True if ``pid`` is alive (not a zombie) and is the process recorded (not a recycled PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or (len(fields) > 19 and fields[19] == str(start_ticks))


def signal_process(pid: int, pgid: int | None, sig: int) -> None:
    """Signal a process group we created (pgid == pid), else the single process."""
    try:
        if pgid is not None and pgid == pid and os.getpgid(pid) == pgid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_recorded(entries: Iterable[dict[str, Any]], grace_s: float = 3.0) -> list[int]:
    """SIGTERM every recorded process that still matches (its group, where it leads one), wait
    up to ``grace_s``, then SIGKILL what is left. Returns the PIDs signalled."""
    targets = [e for e in entries if same_process(e["pid"], e.get("start_ticks"))]
    for e in targets:
        signal_process(e["pid"], e.get("pgid"), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(same_process(e["pid"], e.get("start_ticks")) for e in targets):
        time.sleep(0.05)
    for e in targets:
        if same_process(e["pid"], e.get("start_ticks")):
            signal_process(e["pid"], e.get("pgid"), signal.SIGKILL)
    return [e["pid"] for e in targets]


class PidRegistry:
    """Append-only record of the processes started (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    @classmethod
    def for_prefix(cls, prefix: str, root: Path = REGISTRY_ROOT) -> "PidRegistry":
        """The registry ``pdtb clean --prefix`` reads (the caller validated ``prefix``)."""
        return cls(root / prefix / "pids.jsonl")

    def record(self, pid: int, name: str, *, pgid: int | None = None, argv: Sequence[str] = ()) -> None:
        """A process started (a process already gone is not recorded: there is nothing to stop)."""
        start = proc_start_ticks(pid)
        if start is not None:
            self._append({"pid": pid, "start_ticks": start, "name": name, "pgid": pgid,
                          "argv": [str(a) for a in argv][:8]})

    def stopped(self, pid: int, returncode: int | None) -> None:
        """The process ``pid`` recorded last has ended, with ``returncode``."""
        starts = [e for e in self.entries() if e["pid"] == pid]
        if starts:
            self._append({"pid": pid, "start_ticks": starts[-1]["start_ticks"], "returncode": returncode})

    def entries(self) -> list[dict[str, Any]]:
        """Every recorded process, with ``running`` (not seen to end) and its ``returncode``."""
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return []
        procs: dict[tuple[int, int], dict[str, Any]] = {}
        for line in lines:
            try:
                e = json.loads(line)
                key = (int(e["pid"]), int(e["start_ticks"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line
            if "name" in e:
                procs[key] = {"pid": key[0], "start_ticks": key[1], "name": str(e["name"]), "pgid": e.get("pgid"),
                              "argv": e.get("argv", []), "running": True, "returncode": None}
            elif key in procs:
                procs[key].update(running=False, returncode=e.get("returncode"))
        return list(procs.values())

    def alive(self) -> list[dict[str, Any]]:
        """Recorded processes that still run (same PID and same start time)."""
        return [e for e in self.entries() if same_process(e["pid"], e["start_ticks"])]

    def settle(self) -> None:
        """Record as ended the processes that are gone without an end recorded (a group member
        killed with its leader, a process that exited after the last look), so the record's
        ``running`` means running."""
        for e in self.entries():
            if e["running"] and not same_process(e["pid"], e["start_ticks"]):
                self._append({"pid": e["pid"], "start_ticks": e["start_ticks"], "returncode": None})

    def forget_ended(self) -> None:
        """Keep only the processes that still run (remove the file when none is left), so a
        prefix's registry used run after run does not grow without bound."""
        alive = self.alive()
        if not alive:
            self.clear()
            return
        with self._lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps({k: e[k] for k in ("pid", "start_ticks", "name", "pgid", "argv")}) + "\n"
                                   for e in alive))
            tmp.replace(self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()  # a prefix's own directory; a run directory is not empty
        except OSError:
            pass

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:  # one short line per write: appended whole
                f.write(json.dumps(entry) + "\n")
