"""Loopback runs shared by the runner, API and fault tests: a small scenario and leftover checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.pids import PidRegistry, same_process

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] not in "ZX"


def interruptible() -> None:
    """preexec_fn for a `pdtb run` a test will send SIGINT to, as Ctrl-C at a terminal would: a
    suite started in the background of a script inherits SIGINT ignored (POSIX, for asynchronous
    commands), and Python then installs no KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


TEARDOWN_S = 60.0
"""What a run interrupted for taking too long gets to tear down (a pair run needs ~10 s idle)."""


def finish(proc: subprocess.Popen, timeout_s: float) -> tuple[str, str]:
    """(stdout, stderr) of a `pdtb` process started with :func:`interruptible`, within
    ``timeout_s``. Past it the run gets SIGINT, as Ctrl-C, and TEARDOWN_S to tear down, then the
    test fails: a run a loaded host slowed must not be killed outright, or its namespaces, root
    addresses and remote processes stay and fail every later test that builds a net. A test
    using this needs a pytest timeout above ``timeout_s + TEARDOWN_S``."""
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=TEARDOWN_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"pdtb did not finish within {timeout_s:g} s; interrupted, it exited "
                             f"{proc.returncode}: {err[-2000:]}") from None


def start_pdtb(args: list[str]) -> subprocess.Popen:
    """``python -m testbed.cli ARGS`` in the repository, output piped, interruptible."""
    return subprocess.Popen([sys.executable, "-m", "testbed.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)


def run_pdtb(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """:func:`start_pdtb`, ended by :func:`finish`."""
    proc = start_pdtb(args)
    out, err = finish(proc, timeout_s)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(pred, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


REPO = Path(__file__).resolve().parent.parent
PREFIX = "x7"  # local runs record their PIDs for `pdtb clean` under this prefix (as root); not a Mininet one
PREFILL_HW, DECODE_HW, MODEL = "trn2", "cs3", "llama-3.1-8b"

TOPOLOGY = f"""
kind: topology
name: loctest
hosts:
  - {{name: router, role: router}}
  - {{name: p1, role: prefill, hardware: {PREFILL_HW}}}
  - {{name: d1, role: decode, hardware: {DECODE_HW}}}
  - {{name: client, role: client}}
switches:
  - {{name: sf, network: frontend}}
  - {{name: se, network: efa}}
links:
  - {{name: fr, a: router, b: sf, class: frontend}}
  - {{name: fp1, a: p1, b: sf, class: frontend}}
  - {{name: fd1, a: d1, b: sf, class: frontend}}
  - {{name: fc, a: client, b: sf, class: frontend}}
  - {{name: ep1, a: p1, b: se, class: efa, params: {{bandwidth: 3.2Tbps, latency: 15us}}}}
  - {{name: ed1, a: d1, b: se, class: efa, params: {{bandwidth: 3.2Tbps, latency: 15us}}}}
"""


def write_scenario(tmp_path: Path, requests: int = 8, rate: float = 8.0, output: int = 16, extra: str = "") -> Path:
    (tmp_path / "topo.yaml").write_text(TOPOLOGY)
    path = tmp_path / "scenario.yaml"
    path.write_text(f"""
kind: scenario
name: loctest
topology: topo.yaml
model: {MODEL}
emulation: {{backend: local}}
workload:
  arrival: {{process: fixed, rate: {rate}}}
  requests: {requests}
  prompt_tokens: 512
  output_tokens: {output}
slo: {{ttft_ms: 2000, tpot_ms: 200}}
{extra}
""")
    return path


def processes_of(run_dir: Path) -> list[int]:
    """PIDs of live processes whose command line mentions the run directory (daemons, mosquitto)."""
    needle = str(run_dir).encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "cmdline").read_bytes() and alive(int(d.name)):
                out.append(int(d.name))
        except OSError:
            continue
    return out


def no_leftovers(run_dir: Path) -> None:
    assert wait_for(lambda: not processes_of(run_dir), 10), f"leftover processes: {processes_of(run_dir)}"
    for e in PidRegistry(run_dir / "pids.jsonl").entries():
        assert not same_process(e["pid"], e["start_ticks"]), f"{e['name']} (pid {e['pid']}) still runs"
