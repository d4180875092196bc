"""Process plumbing a user relies on when a run misbehaves."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

WAITING = """
import time
from mmcl.engine.runtime import enable_stack_dumps

def waiting_for_a_peer():
    print("ready", flush=True)
    time.sleep(60)

enable_stack_dumps()
waiting_for_a_peer()
"""


def test_sigusr1_prints_the_stacks_and_the_process_keeps_running():
    process = subprocess.Popen([sys.executable, "-c", WAITING], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        process.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
        assert process.poll() is None  # still running after the dump
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "most recent call first" in stderr
    assert "in waiting_for_a_peer" in stderr
