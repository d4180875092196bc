import pytest


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The demo digits at 16 px in 4 train shards, built once for all end-to-end tests."""
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=400)
    return out
