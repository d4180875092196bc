"""Process plumbing a user relies on when a run misbehaves."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

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


LEAVING_A_RANK = """
import atexit, sys
import torch, torch.distributed as dist
from mmcl.distributed import note_joined, run_command

def main():
    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    note_joined()
    atexit.register(print, f"rank {rank} atexit")
    for _ in range(8):  # collectives still finishing in gloo's threads as the rank exits
        dist.all_gather([torch.empty(1 << 18) for _ in range(2)], torch.full((1 << 18,), float(rank)), async_op=True)
    print(f"rank {rank} done", end="")  # not flushed: run_command must flush it
    return 3

run_command(main)
"""


@pytest.mark.slow
def test_a_rank_that_joined_a_gloo_group_exits_with_its_status_while_collectives_finish(tmp_path):
    """Gloo's threads release a collective's tensors after it completes; a rank whose main thread
    reaches interpreter teardown first aborts (SIGABRT, "terminate called without an active
    exception"): 6 of 8 of these launches did with a plain `sys.exit(main())`. `run_command`
    skips teardown, so every launch ends with main's status, its atexit handlers run and its
    output flushed."""
    for launch in range(2):
        store = tmp_path / f"store{launch}"  # a file store: no TCP port another test's launch could take meanwhile
        ranks = [subprocess.Popen([sys.executable, "-c", LEAVING_A_RANK, str(rank), str(store)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        outputs = [rank.communicate(timeout=120) for rank in ranks]
        for rank, (process, (stdout, stderr)) in enumerate(zip(ranks, outputs)):
            assert process.returncode == 3, stderr[-2000:]
            assert stdout == f"rank {rank} donerank {rank} atexit\n", stdout
            assert "terminate called" not in stderr


def test_run_command_without_a_process_group_is_plain_python_exit():
    """In-process callers (tests, notebooks) keep Python's own exit: SystemExit, exceptions raised."""
    import pytest

    from mmcl.distributed import run_command

    with pytest.raises(SystemExit) as exit:
        run_command(lambda: 5)
    assert exit.value.code == 5

    def failing() -> int:
        raise ValueError("broken")

    with pytest.raises(ValueError, match="broken"):
        run_command(failing)


def test_an_unexpected_error_prints_its_traceback_without_credentials():
    code = ("from mmcl.distributed import run_command\n"
            "def main():\n"
            "    raise RuntimeError('cannot open https://reader:pw-Secret1@h/d/00001.tar?token=tok-Secret2')\n"
            "run_command(main)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "RuntimeError: cannot open https://***@h/d/00001.tar?token=***"
    assert "Traceback (most recent call last):" in result.stderr and "Secret" not in result.stderr
