"""Distilling from a reinforced store (`distill.store`): the loader replays each sample's stored crop
for the student (checked against an independent crop of the image), rotates the stored crops over
epochs deterministically, skips and counts samples the store lacks, and the distill loss from a
store holding the teacher's features of exactly the student's crops equals the online teacher's;
several teachers are ensembled as MobileCLIP does; the config refuses what is not a store."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from mmcl.config import ConfigError, from_dict
from mmcl.data.loader import TeacherData, build_train_loader
from mmcl.data.reinforced import ReinforcedStore
from mmcl.data.shards import derive_seed
from mmcl.data.transforms import CLIP_MEAN, CLIP_STD, RandomResizedCropU8, clip_train_transform, normalize_uint8
from mmcl.engine import training_data
from mmcl.losses import DistillLoss
from mmcl.models import build_model, build_tokenizer
from mmcl.objectives.distill import DistillObjective
from mmcl.objectives.teacher import load_teacher
from reinforced_store import image_tensor, random_draw, tar_samples, write_store

VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
       "num_attention_heads": 2, "intermediate_size": 64}
BERT = {"model_type": "bert", "vocab_size": 300, "max_position_embeddings": 16, "hidden_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
SHARDS = "{00000..00001}.tar"  # 2 shards x 24 samples
K, STORE_SEED, RUN_SEED, SCALE = 3, 5, 11, (0.3, 1.0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from data_tools.demo_dataset import build_demo

    out = tmp_path_factory.mktemp("digits")
    build_demo(out, image_size=16, samples_per_shard=24)
    return out


def clip_teacher(out, seed: int, tokenizer, scale: float | None = None):
    """A tiny transformers CLIPModel at 24 px with its own normalisation and the digits' tokenizer."""
    config = CLIPConfig(text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "max_position_embeddings": 20},
                        vision_config={"image_size": 24, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                       "num_hidden_layers": 1, "num_attention_heads": 2},
                        projection_dim=12)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    if scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(scale)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.2, 0.2]).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, digits):
    return clip_teacher(tmp_path_factory.mktemp("teacher"), 3, digits / "tokenizer")


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits, teacher_dir):
    return write_store(tmp_path_factory.mktemp("s") / "store", str(digits / "train" / SHARDS), [teacher_dir], K,
                       STORE_SEED, crop_scale=SCALE)


def run_config(digits, objectives=None, **distill):
    return from_dict(run_config_dict(digits, objectives, **distill))


def run_config_dict(digits, objectives=None, **distill) -> dict:
    return {"model": {"image": {"config": VIT, "pooling": "cls"},
                     "text": {"config": BERT, "tokenizer": str(digits / "tokenizer"), "context_length": 16},
                     "embed_dim": 16},
           "objectives": objectives or {"clip": 1.0, "distill": 1.0}, "distill": distill, "seed": RUN_SEED,
           "data": {"train_shards": str(digits / "train" / SHARDS), "image_size": 16, "num_workers": 0,
                    "shuffle_buffer": 8, "train_crop_scale": list(SCALE)},
           "train": {"micro_batch_size": 8}}


def store_loader(digits, store, num_workers: int = 0):
    cfg = run_config(digits, store=str(store))
    cfg.data.num_workers = num_workers
    return cfg, training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1)


def decoded_images(digits) -> dict[str, torch.Tensor]:
    return {s["__key__"]: image_tensor(s["png"]) for shard in (0, 1)
            for s in tar_samples(str(digits / "train" / f"{shard:05d}.tar"))}


def expected_pixels(image: torch.Tensor, key: str, epoch: int) -> torch.Tensor:
    """The stored crop k of `key` in `epoch`, from the drawn pixel box itself: an independent crop + resize."""
    k = derive_seed(RUN_SEED, "augmentation", epoch, key) % K
    top, left, height, width, flip = random_draw(STORE_SEED, K, SCALE, 0.5)(key, image)[k]
    view = F.resized_crop(image, top, left, height, width, [16, 16], interpolation=F.InterpolationMode.BICUBIC,
                          antialias=True)
    return normalize_uint8((F.horizontal_flip(view) if flip else view)[None], CLIP_MEAN, CLIP_STD)[0]


def test_the_student_sees_the_stored_crop_of_the_epoch_and_the_batch_carries_the_stored_features(digits, store):
    _, loader = store_loader(digits, store)
    images = decoded_images(digits)
    rows = pq.read_table(sorted((store / "parts").glob("*.parquet"))[0]).to_pylist()
    rows += pq.read_table(sorted((store / "parts").glob("*.parquet"))[1]).to_pylist()
    stored = {row["key"]: row for row in rows}
    seen = 0
    for batch in loader:
        assert set(batch) >= {"pixel_values", "input_ids", "teacher_image_features_0", "teacher_text_features_0"}
        assert "teacher_pixel_values" not in batch
        assert batch["teacher_image_features_0"].dtype == torch.float32 and batch["teacher_image_features_0"].shape == (8, 12)
        for i, key in enumerate(batch["keys"]):
            assert torch.equal(batch["pixel_values"][i], expected_pixels(images[key], key, 0)), key
            k = derive_seed(RUN_SEED, "augmentation", 0, key) % K
            row = np.asarray(stored[key]["image_embedding_0"], np.float16).reshape(K, 12)[k]
            assert torch.equal(batch["teacher_image_features_0"][i], torch.from_numpy(row).float())
            text = np.asarray(stored[key]["text_embedding_0"], np.float16)
            assert torch.equal(batch["teacher_text_features_0"][i], torch.from_numpy(text).float())
            seen += 1
    assert seen == 48 and loader.skip_counts() == {}


def test_the_stored_crop_rotates_over_epochs_the_same_way_on_every_run_and_in_workers(digits, store):
    images = decoded_images(digits)

    def epochs(num_workers):
        _, loader = store_loader(digits, store, num_workers)
        out = []
        for epoch in range(4):
            loader.set_epoch(epoch)
            out.append({key: pixels for batch in loader for key, pixels in zip(batch["keys"], batch["pixel_values"])})
        return out

    first, again = epochs(0), epochs(2)
    assert [sorted(e) for e in first] == [sorted(images)] * 4
    for epoch, (seen, repeat) in enumerate(zip(first, again)):
        for key in images:
            assert torch.equal(seen[key], expected_pixels(images[key], key, epoch)), (epoch, key)
            assert torch.equal(repeat[key], seen[key])
    chosen = {key: [derive_seed(RUN_SEED, "augmentation", e, key) % K for e in range(4)] for key in images}
    assert sum(len(set(ks)) > 1 for ks in chosen.values()) > 0.8 * len(chosen)  # most samples change crop
    changed = sum(not torch.equal(first[0][key], first[1][key]) for key in images)
    assert changed >= sum(ks[0] != ks[1] for ks in chosen.values()) - 2  # distinct stored crops look different


def test_samples_missing_from_the_store_are_skipped_and_counted(digits, teacher_dir, tmp_path):
    keys = sorted(decoded_images(digits))
    left_out = set(keys[::8])  # 6 of 48
    partial = write_store(tmp_path / "store", str(digits / "train" / SHARDS), [teacher_dir], 1, STORE_SEED,
                          leave_out=left_out)
    cfg = run_config(digits, store=str(partial))
    cfg.train.micro_batch_size = 6
    loader = training_data.build(cfg, build_tokenizer(cfg.model.text), 0, 1)
    delivered = [key for batch in loader for key in batch["keys"]]
    assert sorted(set(delivered)) == sorted(set(keys) - left_out)
    assert loader.skip_counts() == {"not_in_store": 6}


class RecordingCrop(RandomResizedCropU8):
    """RandomResizedCropU8 that remembers each box it draws (same draws, same output)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.boxes: list[tuple[int, int, int, int]] = []

    def __call__(self, image):
        box = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        self.boxes.append(box)
        return F.resized_crop(image, *box, [self.size, self.size], interpolation=F.InterpolationMode.BICUBIC,
                              antialias=True)


def distill_loss_of(objective, model, batch):
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])
        outputs.update(objective.batch_outputs(batch))
        return objective(outputs)


def test_the_loss_from_a_store_of_the_student_s_own_crops_equals_the_online_teacher_s(digits, teacher_dir, tmp_path):
    """The key equivalence: K=1, the store holds the teacher's features of exactly the crop each sample's
    student saw in the online run (recorded), so only float16 storage separates the two losses."""
    online_cfg = run_config(digits, teacher=str(teacher_dir))
    teacher = load_teacher(online_cfg.distill)
    inputs = teacher.inputs()
    tokenizer = build_tokenizer(online_cfg.model.text)
    recording = RecordingCrop(16, scale=SCALE)
    online = build_train_loader(online_cfg.data, tokenizer, 16, batch_size=8, seed=RUN_SEED, rank=0, world_size=1,
                                image_transform=recording,
                                teacher=TeacherData(clip_train_transform(inputs.image_size, SCALE), inputs.tokenizer,
                                                    inputs.context_length, inputs.mean, inputs.std))
    online_batches = list(online)
    keys = [key for batch in online_batches for key in batch["keys"]]
    boxes = dict(zip(keys, recording.boxes))
    assert len(boxes) == len(recording.boxes) == 48
    store = write_store(tmp_path / "store", str(digits / "train" / SHARDS), [teacher_dir], 1, STORE_SEED,
                        draw=lambda key, image: [(*boxes[key], False)])
    store_cfg, store_loader_ = store_loader(digits, store)
    store_batches = list(store_loader_)

    torch.manual_seed(0)
    model = build_model(online_cfg.model).eval()
    online_objective = DistillObjective.build(model, online_cfg)
    store_objective = DistillObjective.build(model, store_cfg)
    assert online_objective.teacher is not None and store_objective.teacher is None
    differences = []
    for online_batch, stored_batch in zip(online_batches, store_batches, strict=True):
        assert online_batch["keys"] == stored_batch["keys"]
        assert torch.equal(online_batch["pixel_values"], stored_batch["pixel_values"])  # the same crop, replayed
        assert torch.equal(online_batch["input_ids"], stored_batch["input_ids"])
        expected = distill_loss_of(online_objective, model, online_batch)
        got = distill_loss_of(store_objective, model, stored_batch)
        differences.append(abs(got["loss"].item() - expected["loss"].item()) / expected["loss"].item())
        assert got["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-4, abs=0)
        assert got["i2t_agree"].item() == expected["i2t_agree"].item()
    print(f"store vs online teacher: max relative difference of the distill loss {max(differences):.2e} over "
          f"{len(differences)} batches")


def test_several_teachers_are_ensembled_by_averaging_the_loss_with_each_teacher_s_own_scale(digits, teacher_dir, tmp_path):
    second = clip_teacher(tmp_path / "second", 9, digits / "tokenizer", scale=1.5)
    store = write_store(tmp_path / "store", str(digits / "train" / SHARDS), [teacher_dir, second], 2, STORE_SEED)
    manifest = json.loads((store / "mmcl_curate.json").read_text())
    scales = [t["logit_scale"] for t in manifest["teachers"]]
    assert scales[1] == pytest.approx(np.exp(1.5), rel=1e-6) and scales[0] != scales[1]
    cfg, loader = store_loader(digits, store)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    objective = DistillObjective.build(model, cfg)
    got = distill_loss_of(objective, model, batch)
    with torch.no_grad():
        outputs = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                        attention_mask=batch["attention_mask"])
        each = [DistillLoss()(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                              torch.nn.functional.normalize(batch[f"teacher_image_features_{t}"], dim=-1),
                              torch.nn.functional.normalize(batch[f"teacher_text_features_{t}"], dim=-1), scales[t])["loss"]
                for t in (0, 1)]
    assert got["loss"].item() == pytest.approx((each[0].item() + each[1].item()) / 2, rel=1e-6)
    assert abs(each[0].item() - each[1].item()) > 1e-3  # two teachers that disagree
    state = objective.extra_state()
    assert list(state) == ["store_sha256"]
    objective.load_extra_state(state)
    with pytest.raises(ValueError, match="other teachers' features"):
        objective.load_extra_state({"store_sha256": torch.zeros(32, dtype=torch.uint8)})


def test_the_config_refuses_a_store_beside_a_teacher_and_folders_that_are_not_stores(digits, store, teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"'distill.store' replaces the teacher"):
        run_config(digits, store=str(store), teacher=str(teacher_dir))
    with pytest.raises(ConfigError, match=r"'distill.store' replaces the teacher"):
        run_config(digits, store=str(store), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="which does not exist"):
        run_config(digits, store=str(tmp_path / "nowhere"))
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "mmcl_curate.json").write_text(json.dumps({"command": "score", "version": 1}))
    with pytest.raises(ConfigError, match="is not a reinforced store"):
        run_config(digits, store=str(tmp_path / "scores"))
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "mmcl_curate.json").write_text(json.dumps({"command": "reinforce", "version": 2}))
    with pytest.raises(ConfigError, match="of version 2, which this mmcl does not read"):
        run_config(digits, store=str(tmp_path / "future"))
    with pytest.raises(ConfigError, match="'distill.store' is set but 'objectives' has no 'distill'"):
        run_config(digits, {"clip": 1.0}, store=str(store))
    with pytest.raises(ConfigError, match="not of class prompts"):
        from_dict({**run_config_dict(digits, store=str(store)), "eval": {"classnames": ["zero"]},
                   "data": {**run_config_dict(digits)["data"], "captions_from_labels": True}})
    cfg = run_config(digits, store=str(store))
    assert ReinforcedStore.open(cfg.distill.store, 0, 16).augmentations == K


def test_an_epoch_continued_on_another_world_size_replays_the_same_stored_crops_each_sample_once(digits, store):
    images = decoded_images(digits)
    cfg = run_config(digits, store=str(store))
    tokenizer = build_tokenizer(cfg.model.text)
    store_data = ReinforcedStore.open(store, RUN_SEED, 16)

    def loaders(world: int):
        return [build_train_loader(cfg.data, tokenizer, 16, batch_size=4, seed=RUN_SEED, rank=r, world_size=world,
                                   store=store_data) for r in range(world)]

    def check(batch) -> list[str]:
        for key, pixels in zip(batch["keys"], batch["pixel_values"]):
            assert torch.equal(pixels, expected_pixels(images[key], key, 0)), key
        return list(batch["keys"])

    before = []
    first = loaders(2)
    for loader in first:
        batches = iter(loader)
        for _ in range(3):  # 3 steps of 2 x 4: 24 of the 48 samples
            before += check(next(batches))
        batches.close()
    states = [json.loads(json.dumps(loader.state_dict())) for loader in first]
    after = []
    for loader in loaders(3):
        assert loader.load_elastic_state(states)["remaining_batches"] == 2
        after += [key for batch in loader for key in check(batch)]
    assert sorted(before + after) == sorted(images)  # each sample once, with the crop its epoch chose
