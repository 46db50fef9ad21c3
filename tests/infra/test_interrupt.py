"""Ctrl-C that Python swallows (raised inside a finalizer) still stops the run at the next round boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]

SCRIPT = """
import os, signal
from infra.interrupt import install, stop_if_requested

install()


class Swallows:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt raised in a finalizer: Python ignores it
        for _ in range(1000):
            pass


Swallows()
print("went on", flush=True)
try:
    stop_if_requested()
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_a_swallowed_ctrl_c_is_raised_again_where_the_run_checks_for_it() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored in" in done.stderr and "KeyboardInterrupt" in done.stderr  # it was swallowed ...
    assert done.stdout == "went on\nstopped\n"  # ... and raised again at the check


def test_without_ctrl_c_the_check_does_nothing() -> None:
    code = "from infra.interrupt import install, stop_if_requested\ninstall()\nstop_if_requested()\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
