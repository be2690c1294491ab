"""The run directory: everything one run produced, in one place.

Layout (``RUN_DIR`` = ``runs/<scenario>-<UTC timestamp>`` unless ``--out`` names one)::

    run.json            what ran: ids, backend, emulation (TDF, byte scale), nodes, prediction, crashes
    scenario.yaml       the resolved scenario (overrides applied, file references absolute)
    workload.jsonl      the requests the client replays
    nodes/<node>.json   per-node configs (0600: they hold the run's secrets)
    logs/<node>.log     each daemon's stdout and stderr
    timeline/<node>.jsonl
    pcap/               captures (when asked)
    broker/             the run's mosquitto config, passwords, ACL and log
    pids.jsonl          PIDs of the processes the run started (removed entries once stopped)
    summary.json, requests.csv, report.html   written at the end
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

DEFAULT_BASE = Path("runs")
_RUN_ID_BAD = re.compile(r"[^a-z0-9-]+")


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader (or a crash) never sees half a file; the
    temporary name carries the PID because several processes may write the same file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file (RFC 4180 quoting, empty cells for None), written atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)   # None becomes an empty cell
    write_atomically(path, out.getvalue())


def utc_stamp(t: float | None = None) -> str:
    return datetime.fromtimestamp(time.time() if t is None else t, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def make_run_id(scenario: str, stamp: str) -> str:
    """A ``SafeName`` (<= 32 chars, lowercase) naming the run on the control plane."""
    tail = stamp.lower().rstrip("z")  # 20261126t203000
    head = _RUN_ID_BAD.sub("-", scenario.lower()).strip("-")[: 31 - len(tail)].strip("-") or "run"
    if not head[0].isalpha():
        head = "r" + head[: 30 - len(tail)]
    return f"{head}-{tail}"


class RunDir:
    """Paths of one run directory, and the ``run.json`` it carries."""

    def __init__(self, root: Path, run_id: str):
        self.root = Path(root)
        self.run_id = run_id
        self._lock = threading.Lock()

    @classmethod
    def create(cls, scenario: str, out: Path | str | None = None, base: Path = DEFAULT_BASE,
               sweep: bool = False) -> "RunDir":
        """Make a fresh run directory; ``out`` may exist only if it is empty.

        A sweep's directory holds only its points' directories (``child``) and the sweep report.
        """
        stamp = utc_stamp()
        run_id = make_run_id(scenario, stamp)
        if out is not None:
            root = Path(out)
            if root.exists() and (not root.is_dir() or any(root.iterdir())):
                from core.config import ConfigError

                raise ConfigError(str(root), [("", "output directory exists and is not empty: choose another --out")])
        else:
            root = base / f"{scenario}-{stamp}"
            n = 1
            while root.exists():  # two runs in the same second
                n += 1
                root = base / f"{scenario}-{stamp}-{n}"
            if n > 1:
                run_id = make_run_id(scenario, f"{stamp[:-1]}{n}")
        rd = cls(root.resolve(), run_id)
        if sweep:
            rd.root.mkdir(parents=True, exist_ok=True)
        else:
            rd.make()
        return rd

    def child(self, label: str) -> "RunDir":
        """The directory of one sweep point, inside this one."""
        rd = RunDir(self.root / label, make_run_id(label, utc_stamp()))
        rd.make()
        return rd

    def make(self) -> None:
        for d in (self.root, self.nodes_dir, self.logs_dir, self.timeline_dir, self.pcap_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.nodes_dir.chmod(0o700)

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def scenario_yaml(self) -> Path:
        return self.root / "scenario.yaml"

    @property
    def workload(self) -> Path:
        return self.root / "workload.jsonl"

    @property
    def nodes_dir(self) -> Path:
        return self.root / "nodes"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def timeline_dir(self) -> Path:
        return self.root / "timeline"

    @property
    def pcap_dir(self) -> Path:
        return self.root / "pcap"

    @property
    def pids(self) -> Path:
        return self.root / "pids.jsonl"

    def node_config(self, node: str) -> Path:
        return self.nodes_dir / f"{node}.json"

    def log(self, node: str) -> Path:
        return self.logs_dir / f"{node}.log"

    def timeline(self, node: str) -> Path:
        return self.timeline_dir / f"{node}.jsonl"

    def read_run_json(self) -> dict[str, Any]:
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError):
            return {}

    def update_run_json(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into run.json (atomic replace: readers never see half a file)."""
        with self._lock:
            data = self.read_run_json()
            data.update(fields)
            write_atomically(self.run_json, json.dumps(data, indent=2, default=_json_default) + "\n")
            return data


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to run.json")
