"""MoCo's shuffling BN over 2 gloo ranks: the key batch is permuted across ranks before the key
encoder and the keys are put back in order."""
import pytest
import torch

from gloo_spawn import run_on_gloo_ranks
from shuffle_bn_cases import shuffle_bn_case


@pytest.mark.slow
def test_shuffled_keys_come_back_to_their_own_images_and_use_other_batch_statistics():
    ranks = run_on_gloo_ranks(shuffle_bn_case, 2)
    for result in ranks:
        # eval mode: BatchNorm uses running statistics, so a key depends on its image only and
        # shuffling must give each image its own key back
        assert torch.allclose(result["eval/shuffled"], result["eval/plain"], atol=1e-5)
        # train mode: the key batch's statistics come from a shuffled mix of both ranks' images
        assert not torch.allclose(result["train/shuffled"], result["train/plain"], atol=1e-3)
        assert result["train/shuffled"].shape == (8, 8)
