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


# The command and a worker's set-up each turn the dumps on: signalled after that, the
# process prints its stacks and goes on (without them, SIGUSR1 would end it).
WIRED = """
import os, signal, sys, time
{setup}
os.kill(os.getpid(), signal.SIGUSR1)
time.sleep(0.5)
print("still running")
"""
SETUPS = {
    "command": "from cli.main import main\nmain(['register', '/nonexistent-a', "
               "'/nonexistent-b', '/nonexistent-out'])",
    "worker": "from flows.cluster import configure_process\n"
              "configure_process(threads=1, warm=False)",
}


def test_the_command_and_a_workers_set_up_turn_stack_dumps_on():
    for name, setup in SETUPS.items():
        done = subprocess.run([sys.executable, "-c", WIRED.format(setup=setup)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        assert done.stdout.strip().endswith("still running"), name
        assert "most recent call first" in done.stderr, name
