import io

import pytest
import torch
from PIL import Image

from mmcl.evaluation.data import build_eval_loader
from mmcl.evaluation.loading import eval_transform

from eval_helpers import COLOURS, classification_samples, png_bytes, write_shards

TRANSFORM = eval_transform(16)


def _collect(loader):
    batches = list(loader)
    return torch.cat([b["index"] for b in batches]), torch.cat([b["label"] for b in batches]), torch.cat([b["pixel_values"] for b in batches])


def test_undecodable_samples_are_skipped_and_counted(tmp_path):
    samples = classification_samples(5)
    samples[1]["png"] = b"not a png"
    samples[3] = {"cls": b"2"}  # no image at all
    write_shards(tmp_path, samples, per_shard=3)
    loader = build_eval_loader(str(tmp_path), TRANSFORM, batch_size=2)
    index, labels, _ = _collect(loader)
    assert labels.tolist() == [0, 2, 4]
    assert index.tolist() == [0, 2, (1 << 32) | 1]  # (shard << 32) | position: dataset order
    assert loader.skipped == {"corrupt_image": 1, "missing_image": 1}


def test_members_above_the_runs_byte_limits_are_skipped_unread_and_counted(tmp_path):
    samples = classification_samples(4)
    samples[1]["png"] = png_bytes(COLOURS[1], size=64)  # a larger image than the others
    samples[2]["txt"] = b"x" * 100  # a caption above the text limit
    write_shards(tmp_path, samples, per_shard=4)
    image_limit = len(samples[1]["png"]) - 1
    assert all(len(s["png"]) <= image_limit for i, s in enumerate(samples) if i != 1)
    loader = build_eval_loader(str(tmp_path), TRANSFORM, batch_size=4, max_image_bytes=image_limit, max_text_bytes=50)
    _, labels, _ = _collect(loader)
    assert labels.tolist() == [0, 3]
    assert loader.skipped == {"image_too_large": 1, "caption_too_large": 1}
    default = build_eval_loader(str(tmp_path), TRANSFORM, batch_size=4)
    assert _collect(default)[1].tolist() == [0, 1, 2, 3] and default.skipped == {}


def test_image_folder_and_saved_datasets_dir_read_the_same_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    names, colours = ["blue", "green", "red"], [COLOURS[2], COLOURS[1], COLOURS[0]]  # folders sort by name
    for name, colour in zip(names, colours):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "folder" / name / f"{i}.png").write_bytes(png_bytes(colour, variant=i))
    folder = build_eval_loader(str(tmp_path / "folder"), TRANSFORM, batch_size=4)
    assert folder.classnames == names
    f_index, f_labels, f_pixels = _collect(folder)
    assert f_labels.tolist() == [0, 0, 1, 1, 2, 2]

    images = [Image.open(io.BytesIO(png_bytes(c, variant=i))) for c in colours for i in range(2)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 0, 1, 1, 2, 2]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    hf = build_eval_loader(str(tmp_path / "hf"), TRANSFORM, batch_size=4)
    assert hf.classnames == names
    h_index, h_labels, h_pixels = _collect(hf)
    assert torch.equal(h_labels, f_labels) and torch.equal(h_index, f_index) and torch.allclose(h_pixels, f_pixels)
