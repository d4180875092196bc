import pytest

from curate_helpers import clip_folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random-init transformers CLIPModel folder (16 px, D = 12) with its processor and tokenizer."""
    return clip_folder(tmp_path_factory.mktemp("clip"))
