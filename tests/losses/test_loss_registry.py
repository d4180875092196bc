import pytest

from mmcl.losses import LOSSES, ClipLoss, SigLipLoss, build_loss


def test_build_loss_returns_registered_modules_with_kwargs():
    assert set(LOSSES) >= {"clip", "siglip"}
    clip = build_loss("clip", chunk_size=128)
    assert isinstance(clip, ClipLoss) and clip.chunk_size == 128
    assert isinstance(build_loss("siglip"), SigLipLoss)


def test_build_loss_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"Unknown loss 'clipp'; known losses are: .*clip.*siglip"):
        build_loss("clipp")
