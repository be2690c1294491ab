"""The repository's setup contract: README commands, CI script, Vagrantfile, CLI entry point."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci_lines = [l for l in (REPO / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in readme


def test_readme_has_two_commands_starting_with_bootstrap() -> None:
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^\./bootstrap\.sh && .+$", readme, flags=re.M)
    assert len(commands) >= 2, commands


def test_pdtb_version() -> None:
    out = subprocess.run([sys.executable, "-m", "testbed.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert re.match(r"^pdtb \d+\.\d+", out.stdout)


@pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (optional; Debian's package)")
def test_vagrant_validate() -> None:
    out = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    vagrantfile = (REPO / "Vagrantfile").read_text()
    assert "ubuntu-24.04" in vagrantfile and "bootstrap.sh" in vagrantfile
    assert re.search(r"cpus\s*=\s*([4-9]|\d\d)", vagrantfile) and re.search(r"memory\s*=\s*(8192|\d{5})", vagrantfile)


@pytest.mark.root
def test_bootstrap_second_run_changes_nothing() -> None:
    # the suite runs after bootstrap.sh, so a run now must find everything in place
    out = subprocess.run(["./bootstrap.sh"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "installing" not in out.stdout and "creating" not in out.stdout, out.stdout
    assert "bootstrap: ready (pdtb " in out.stdout
