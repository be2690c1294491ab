"""Shared test fixtures."""
from __future__ import annotations

import fcntl
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


# Two suites may run on one machine at once (two checkouts, CI beside a developer). What a test
# module creates machine-wide (namespaces, interfaces, iptables rules, /run/pdtb registries of the
# fixed TEST_PREFIXES, loopback daemons of the local backend) would collide, and each suite's leak
# check would see the other's. So every module runs holding a machine-wide lock, except modules
# marked ``concurrent_safe``: those create nothing outside their tmp_path and their own child
# processes, and run while the other suite holds the lock.
SUITE_LOCK = Path("/run/pdtb/tests.lock")


class _SuiteLock:
    """The machine-wide flock, held from a module's first test until the next module that does not need it."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def hold(self) -> None:
        if self._fd is None:
            SUITE_LOCK.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(SUITE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


_SUITE_LOCK = _SuiteLock()


def concurrent_safe(item: pytest.Item) -> bool:
    """Whether the item's module is marked ``pytestmark = pytest.mark.concurrent_safe``."""
    module = item.getparent(pytest.Module)
    return module is not None and module.get_closest_marker("concurrent_safe") is not None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    # Outermost wrapper, so the wait for the lock is not counted in pytest-timeout's per-test limit.
    # The previous module's module-scoped fixtures (its leak check) were torn down in the previous
    # item's protocol, so switching here never drops the lock under a module that still needs it.
    if os.geteuid() == 0 and not concurrent_safe(item):
        _SUITE_LOCK.hold()
    else:
        _SUITE_LOCK.release()
    yield


def pytest_sessionfinish(session: pytest.Session) -> None:
    _SUITE_LOCK.release()


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
    """After every test module (as root): nothing of the project is left that was not there before.
    A ``concurrent_safe`` module runs while another suite may change the machine-wide state, so
    only its own child processes are checked."""
    if os.geteuid() != 0:
        yield
        return
    import time

    def state() -> dict[str, list[str]]:
        if concurrent_safe(request.node):
            return {"processes": [f"{pid} {cmd}" for pid, cmd in sorted(_descendants(os.getpid()).items())]}
        return _project_state()

    before = state()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        after = state()
        leaked = {k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items()}
        leaked = {k: v for k, v in leaked.items() if v}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert not leaked, f"{request.node.name} left behind: {leaked}"
