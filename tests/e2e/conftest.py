import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo digits at 16 px in 4 train shards, built once for all end-to-end tests."""
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=400)
    return out


@pytest.fixture(scope="session")
def zero_runs(digits, tmp_path_factory):
    """stage -> (config path, run dir, launch result): 8 or 16 steps per ZeRO stage, checkpoints every 4
    (all kept), losses logged every step, zero-shot and retrieval evaluation at the end. The reference
    runs of tests/e2e/test_training.py, and the runs tests/e2e/test_export.py exports."""
    from launch import ZERO_STAGES, ZERO_STEPS, deepspeed_command, run, tiny_run_config, write_config

    runs = {}
    for stage, ds_json in ZERO_STAGES.items():
        out = tmp_path_factory.mktemp(f"zero{stage}")
        config = tiny_run_config(digits, out / "run", steps=ZERO_STEPS[stage], checkpoint_every=4, keep_checkpoints=4)
        config["eval"] = {"zeroshot_shards": str(digits / "classification" / "00000.tar"),
                          "retrieval_shards": str(digits / "val" / "00000.tar"), "batch_size": 180}
        result = run(deepspeed_command(write_config(out / "run.yaml", config), ds_json))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[stage] = (out / "run.yaml", out / "run", result)
    return runs


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
