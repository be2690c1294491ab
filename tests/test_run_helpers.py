"""The test harness's own guard: a run that overstays is interrupted and gets to tear down."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import finish, interruptible

pytestmark = pytest.mark.concurrent_safe  # see tests/conftest.py

TEARDOWN = """
import sys, time
from pathlib import Path
try:
    time.sleep(60)
except KeyboardInterrupt:
    Path(sys.argv[1]).write_text("torn down")
    sys.exit(130)
"""


def test_overstaying_run_is_interrupted_and_tears_down(tmp_path: Path) -> None:
    mark = tmp_path / "teardown"
    proc = subprocess.Popen([sys.executable, "-c", TEARDOWN, str(mark)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    with pytest.raises(AssertionError, match=r"did not finish within 5 s; interrupted, it exited 130"):
        finish(proc, 5.0)   # the child has long set up its KeyboardInterrupt handler by then
    assert mark.read_text() == "torn down" and proc.returncode == 130


def test_run_within_its_time_is_returned() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "print('ok')"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=interruptible)
    assert finish(proc, 30.0) == ("ok\n", "")
