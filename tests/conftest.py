"""Shared test fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked `root` build network namespaces, shape links and start tcpdump. CI runs as root,
    # so they run there; a developer without root gets a skip with the reason instead of a failure.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, tc, iptables); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_trace() -> Path:
    """The Azure code trace of ../shared, beside the checkout (as in CI); skipped without it."""
    path = REPO.parent / "shared" / "traces" / "azure_llm_2023_code.csv"
    if not path.exists():
        pytest.skip("shared trace not beside the checkout")
    return path


# prefixes the tests give their runs (the default pt, test_runner_local's x7, test_fabric_net's pb, ...)
TEST_PREFIXES = ("pt", "pb", "pc", "pk", "x7")
LEAK_GRACE_S = 5.0  # a process killed in a module's last teardown may take a moment to be reaped


def _descendants(root_pid: int) -> dict[int, str]:
    """Processes below ``root_pid`` (pytest itself), with their command lines."""
    parents: dict[int, int] = {}
    cmds: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] in "ZX":  # a zombie is already dead; its parent reaps it
            continue
        parents[int(d.name)] = int(fields[1])
        cmds[int(d.name)] = cmd
    out = {}
    for pid in parents:
        p = parents.get(pid)
        while p is not None and p > 1:
            if p == root_pid:
                out[pid] = cmds[pid]
                break
            p = parents.get(p)
    return out


def _project_state() -> dict[str, list[str]]:
    """What the project may create outside a test's tmp_path: namespaces, interfaces, iptables
    rules, delayer work dirs and PID registries of the test prefixes, and child processes."""
    import subprocess

    from fabric.cleanup import our_links, our_netns, prefix_registry, stale_delayer_dirs

    state: dict[str, list[str]] = {"namespaces": [], "interfaces": [], "delayer dirs": [], "registered processes": []}
    for prefix in TEST_PREFIXES:
        state["namespaces"] += our_netns(prefix)
        state["interfaces"] += our_links(prefix)
        state["delayer dirs"] += [str(p) for p in stale_delayer_dirs(prefix)]
        state["registered processes"] += [f"{e['pid']} {e['name']}" for e in prefix_registry(prefix).alive()]
    rules = []
    for table in ("raw", "mangle", "filter", "nat"):
        dump = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True).stdout
        rules += [f"{table}: {line}" for line in dump.splitlines() if line.startswith("-A ") and "pdtb:" in line]
    state["iptables rules"] = rules
    state["processes"] = [f"{pid} {cmd}" for pid, cmd in sorted(_descendants(os.getpid()).items())]
    return state


@pytest.fixture(scope="module", autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    """After every test module (as root): nothing of the project is left that was not there before."""
    if os.geteuid() != 0:
        yield
        return
    import time

    before = _project_state()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        after = _project_state()
        leaked = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
        leaked = {k: v for k, v in leaked.items() if v}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert not leaked, f"{request.node.name} left behind: {leaked}"
