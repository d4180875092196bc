"""NaFlex patches (SigLIP 2): mmcl's data-worker transform equals transformers' Siglip2ImageProcessor."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mmcl.data import build_train_loader
from mmcl.data.naflex import NaFlexPatchesU8, naflex_batch
from mmcl.data.settings import NaFlexConfig

HALF = (0.5, 0.5, 0.5)


def smooth_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def as_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("height, width", [(60, 80), (80, 60), (23, 97), (120, 20), (32, 32), (7, 5)])
def test_patches_equal_the_siglip2_processors_for_every_aspect_ratio(height, width):
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=8, max_num_patches=24)
    image = smooth_image(height, width)
    expected = processor(images=[image], return_tensors="pt")
    ours = naflex_batch([NaFlexPatchesU8(8, 24)(as_tensor(image))], HALF, HALF)
    assert ours["spatial_shapes"].tolist() == expected["spatial_shapes"].tolist()
    assert ours["pixel_attention_mask"].tolist() == expected["pixel_attention_mask"].tolist()
    assert ours["pixel_values"].shape == expected["pixel_values"].shape == (1, 24, 3 * 8 * 8)
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"].float(), atol=1e-5)


def test_a_batch_pads_each_image_to_the_sequence_length_with_its_own_grid():
    transform = NaFlexPatchesU8(4, 10)
    wide, tall = transform(as_tensor(smooth_image(4, 40))), transform(as_tensor(smooth_image(24, 8)))
    batch = naflex_batch([wide, tall], HALF, HALF)
    assert batch["spatial_shapes"].tolist() == [[1, 10], [5, 2]]
    assert batch["pixel_attention_mask"].sum(1).tolist() == [10, 10]
    small = naflex_batch([transform(as_tensor(smooth_image(4, 4)))], HALF, HALF)
    # a small square image is scaled up to the largest square grid that fits: 3 x 3 of 10, one padded slot
    assert small["spatial_shapes"].tolist() == [[3, 3]] and small["pixel_attention_mask"][0].tolist() == [1] * 9 + [0]
    assert small["pixel_values"][0, 9:].abs().sum().item() == 0.0


@pytest.fixture
def mixed_shards(tmp_path, kit):
    """Images of mixed aspect ratios plus one corrupt sample."""
    sizes = [(40, 16), (16, 40), (32, 32), (64, 24), (20, 50), (48, 48)]
    samples = [(f"s{i}", {"jpg": kit.image_bytes(i, size=size), "txt": f"a photo of the cat number {i}".encode()})
               for i, size in enumerate(sizes)]
    samples.append(("corrupt", {"jpg": b"\xff\xd8\xff\xe0" + b"\x13" * 300, "txt": b"a cat"}))
    kit.write_shard(tmp_path / "00000.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"00000.tar": len(samples)}))
    return f"{tmp_path}/00000.tar"


def test_the_train_loader_yields_naflex_batches_skips_bad_images_and_resumes_exactly(mixed_shards, kit, tokenizer):
    cfg = kit.data_config(mixed_shards, naflex=NaFlexConfig(patch_size=8, max_num_patches=16), num_workers=1,
                          image_mean=list(HALF), image_std=list(HALF))
    make = lambda: build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, exhaust=True)
    loader = make()
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == [f"s{i}" for i in range(6)]
    assert dict(Counter(loader.skip_counts())) == {"corrupt_image": 1}
    first = batches[0]
    assert first["pixel_values"].shape == (2, 16, 3 * 64) and first["pixel_values"].dtype == torch.float32
    assert first["pixel_attention_mask"].shape == (2, 16) and first["spatial_shapes"].shape == (2, 2)
    grids = {k: tuple(s) for b in batches for k, s in zip(b["keys"], b["spatial_shapes"].tolist())}
    assert grids["s0"][1] > grids["s0"][0]  # 40 wide x 16 tall: a wide grid
    assert grids["s1"][0] > grids["s1"][1]
    assert all(h * w <= 16 for h, w in grids.values())
    partial = make()
    next(iter(partial))
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(partial.state_dict())))
    rest = list(resumed)
    assert [b["keys"] for b in rest] == [b["keys"] for b in batches[1:]]
    for a, b in zip(rest, batches[1:]):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["spatial_shapes"], b["spatial_shapes"])
