import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo digits at 16 px in 4 train shards, built once for all end-to-end tests."""
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=400)
    return out


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
