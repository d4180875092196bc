import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo digits at 16 px in 4 train shards, built once for all end-to-end tests."""
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=400)
    return out


@pytest.fixture(scope="session")
def in_process_checks(tmp_path_factory) -> dict:
    """name -> results of tests/e2e/in_process_checks.py: the single-step engine checks of several
    test files (accumulation, patch dropout, distillation, BYOL's EMA), all in one 2-rank launch."""
    import json

    from launch import BIN, REPO, free_port, run

    out = tmp_path_factory.mktemp("in_process_checks") / "results.json"
    result = run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                  str(REPO / "tests" / "e2e" / "in_process_checks.py"), str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="session", autouse=True)
def remove_leftover_shared_memory():
    """Runs killed on purpose (kill -9) cannot remove their DeepSpeed /dev/shm buffers; do it after the session."""
    import glob
    import os
    import time

    started = time.time()
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            if os.path.getmtime(path) >= started:
                os.unlink(path)
        except OSError:
            pass
