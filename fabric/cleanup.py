"""Leave nothing behind: a registry of the PIDs a run started, and ``clean(prefix)``.

Every process the fabric starts (Mininet host and switch shells, daemons started with
``FabricNet.popen``, delayers, tcpdump) and every daemon the orchestrator starts is recorded in
the prefix's ``core.pids.PidRegistry`` (``/run/pdtb/<prefix>/pids.jsonl``) with its kernel start time, so a crashed run's processes can be found later and a recycled PID is never
killed by mistake. ``clean`` kills exactly those, then deletes network namespaces and interfaces
whose names start with the prefix, iptables rules in the root namespace whose comment is
``pdtb:<prefix>...``, and the temp dirs of the prefix's NFQUEUE delayers whose process is gone.
It never kills by process name (no ``mn -c``, ``pkill``, ``killall``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.pids import PidRegistry, kill_recorded
from fabric.shaping import check_prefix
from fabric.shaping.nfqdelay import WORKDIR_PREFIX

def prefix_registry(prefix: str) -> PidRegistry:
    """The registry of the processes a prefix's runs started (``/run/pdtb/<prefix>/pids.jsonl``)."""
    return PidRegistry.for_prefix(check_prefix(prefix))


def our_name(name: str, prefix: str) -> bool:
    """Names the fabric makes: prefix + a node name, optionally ``-`` and a port/tag."""
    return re.fullmatch(rf"{re.escape(prefix)}[a-z][a-z0-9]*(-[a-z0-9]+)?", name) is not None


def our_links(prefix: str) -> list[str]:
    """Root-namespace interfaces carrying the prefix (bridges, switch ports, root attachments)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if our_name(name, prefix):
            names.append(name)
    return names


def our_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if re.fullmatch(rf"{re.escape(prefix)}[a-z0-9]+", n)]


def remove_root_rules(prefix: str) -> int:
    """Delete root-namespace iptables rules commented ``pdtb:<prefix>...``; returns how many."""
    removed = 0
    for table in ("raw", "mangle", "filter"):
        dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True)
        if dump.returncode != 0:
            continue
        for line in dump.stdout.splitlines():
            if line.startswith("-A ") and re.search(rf'--comment "?pdtb:{re.escape(prefix)}(:|"|\s|$)', line):
                spec = line[3:].replace('"', "").split()
                proc = subprocess.run(["iptables", "-w", "5", "-t", table, "-D", *spec], capture_output=True)
                removed += proc.returncode == 0
    return removed


def _control_paths_in_use() -> set[str]:
    """``--control`` socket paths on the command line of every running process: a delayer's
    temp dir is in use while its process runs (the processes are only read, never signalled)."""
    used = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        used.update(os.fsdecode(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg == b"--control")
    return used


def stale_delayer_dirs(prefix: str, tmp: Path | None = None) -> list[Path]:
    """Temp dirs (``pdtb-nfq-<interface>.<random>``) of delayers on the prefix's interfaces whose
    process no longer runs: what a crashed run leaves in the temp directory."""
    tmp = Path(tempfile.gettempdir()) if tmp is None else tmp
    candidates = []
    for path in tmp.glob(f"{WORKDIR_PREFIX}*"):
        intf, dot, _ = path.name[len(WORKDIR_PREFIX):].rpartition(".")
        if dot and our_name(intf, prefix) and path.is_dir() and not path.is_symlink():
            candidates.append(path)
    if not candidates:
        return []
    used = {str(Path(p).parent) for p in _control_paths_in_use()}
    return sorted(p for p in candidates if str(p) not in used)


@dataclass
class CleanReport:
    killed: list[int] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    rules: int = 0
    workdirs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"killed processes: {self.killed or 'none'}", f"deleted namespaces: {self.netns or 'none'}",
                f"deleted interfaces: {self.links or 'none'}", f"deleted iptables rules: {self.rules}",
                f"deleted delayer directories: {self.workdirs or 'none'}"]


def clean(prefix: str = "pt") -> CleanReport:
    """Remove a run's leftovers: recorded processes, then namespaces, interfaces, root rules and
    the temp dirs of its delayers (after the kills, so a killed delayer's dir goes too)."""
    registry = prefix_registry(prefix)
    report = CleanReport()
    report.killed = kill_recorded(registry.entries())
    for ns in our_netns(prefix):
        if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
            report.netns.append(ns)
    # killing the host shells frees their namespaces and with them the host ends of the veths
    for name in our_links(prefix):
        if subprocess.run(["ip", "link", "del", "dev", name], capture_output=True).returncode == 0:
            report.links.append(name)
    report.rules = remove_root_rules(prefix)
    for path in stale_delayer_dirs(prefix):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            report.workdirs.append(str(path))
    registry.clear()
    return report
