"""`kill -USR1` on a dreg process prints its threads' stacks and leaves it running."""

from __future__ import annotations

import subprocess
import sys

PROGRAM = """
import os, signal, time
from dreg.process import enable_stack_dumps

def waiting_here():
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.5)

enable_stack_dumps()
waiting_here()
print("still running")
"""


def test_sigusr1_prints_every_stack_and_the_process_goes_on():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "still running"
    assert "waiting_here" in done.stderr
