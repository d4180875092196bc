"""NaFlex per-step sequence lengths and the token budget (data.naflex.sequence_lengths / token_budget).

Real shards of mixed-aspect JPEGs; ranks are simulated in one process (each loader gets its rank and
world size), as tests/data/test_elastic_resume.py does.
"""
import json
from collections import Counter

import pytest
import torch

from mmcl.coerce import ConfigError, build
from mmcl.data import build_train_loader
from mmcl.data.naflex import LengthSchedule
from mmcl.data.settings import NaFlexConfig

PATCH, LENGTHS, BUDGET, ACCUM, SEED = 4, [8, 16, 24], 48, 2, 5  # B_L = 6, 3, 2 images per micro-batch
SIZES = [(40, 16), (16, 40), (32, 32), (64, 24), (20, 52), (48, 20)]  # (width, height)


@pytest.fixture
def shards(tmp_path, kit):
    """4 shards x 24 mixed-aspect samples without sizes.json; the epoch is set to 48 samples
    (data.samples_per_epoch), so no consumer runs short and none repeats a sample."""
    for s in range(4):
        samples = [(f"{s}-{i:02d}", {"jpg": kit.image_bytes(100 * s + i, size=SIZES[(s + i) % len(SIZES)]),
                                     "txt": f"a photo of the cat number {i}".encode()}) for i in range(24)]
        kit.write_shard(tmp_path / f"{s:05d}.tar", samples)
    return str(tmp_path / "{00000..00003}.tar")


def loaders(kit, tokenizer, pattern, world=2, workers=1, budget=BUDGET, lengths=LENGTHS):
    naflex = NaFlexConfig(patch_size=PATCH, max_num_patches=16, sequence_lengths=lengths, token_budget=budget)
    cfg = kit.data_config(pattern, naflex=naflex, num_workers=workers, shuffle_buffer=6, samples_per_epoch=48,
                          image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return [build_train_loader(cfg, tokenizer, 8, batch_size=32, seed=SEED, rank=rank, world_size=world,
                               grad_accum_steps=ACCUM) for rank in range(world)]


def schedule(budget=BUDGET) -> LengthSchedule:
    return LengthSchedule(PATCH, LENGTHS, budget, batch_size=32, grad_accum_steps=ACCUM)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_the_length_of_a_step_is_a_function_of_seed_epoch_and_step_shared_by_its_micro_batches():
    first, again = schedule(), schedule()
    drawn = [first.length(SEED, 0, index) for index in range(40)]
    assert drawn == [again.length(SEED, 0, index) for index in range(40)]
    assert drawn[0::2] == drawn[1::2]  # the 2 micro-batches of each optimizer step share L
    assert set(drawn) == set(LENGTHS)  # every length is drawn
    assert drawn != [first.length(SEED, 1, index) for index in range(40)]  # another epoch, another sequence
    assert drawn != [first.length(SEED + 1, 0, index) for index in range(40)]
    assert first.batch_sizes() == [6, 3, 2] and first.expected_batch == pytest.approx(11 / 3)


def test_every_rank_pads_each_step_to_the_drawn_length_with_budget_over_length_images(shards, kit, tokenizer):
    ranks = loaders(kit, tokenizer, shards, world=2, workers=2)
    # 48 samples // (11/3 expected images x 2 ranks) = 6 micro-batches per rank (whole steps of 2)
    assert [loader.steps_per_epoch for loader in ranks] == [6, 6]
    epochs = [list(loader) for loader in ranks]
    plan = schedule()
    for index, (zero, one) in enumerate(zip(*epochs)):
        length = plan.length(SEED, 0, index)
        for batch in (zero, one):
            images = BUDGET // length
            assert batch["pixel_values"].shape == (images, length, 3 * PATCH * PATCH)
            assert batch["pixel_attention_mask"].shape == (images, length)
            assert batch["input_ids"].shape[0] == len(batch["keys"]) == images
            grids = batch["spatial_shapes"]
            assert (grids[:, 0] * grids[:, 1] <= length).all()
            assert batch["pixel_attention_mask"].sum(1).tolist() == (grids[:, 0] * grids[:, 1]).tolist()
            assert batch["pixel_values"][batch["pixel_attention_mask"] == 0].abs().sum().item() == 0.0
    lengths = [b["pixel_values"].shape[1] for b in epochs[0]]
    assert len(set(lengths)) > 1
    keys = [k for epoch in epochs for b in epoch for k in b["keys"]]
    assert len(keys) == len(set(keys))  # the two ranks read disjoint samples
    wide = {k: tuple(s) for epoch in epochs for b in epoch for k, s in zip(b["keys"], b["spatial_shapes"].tolist())}
    assert any(w > h for h, w in wide.values()) and any(h > w for h, w in wide.values())  # native aspect ratios


def test_exact_resume_mid_epoch_gives_the_same_lengths_and_pixels(shards, kit, tokenizer):
    reference = list(loaders(kit, tokenizer, shards, world=1, workers=2)[0])
    interrupted = loaders(kit, tokenizer, shards, world=1, workers=2)[0]
    take(interrupted, 3)  # mid-step: the resumed run's next micro-batch finishes step 2
    resumed = loaders(kit, tokenizer, shards, world=1, workers=2)[0]
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    rest = list(resumed)
    assert len(rest) == len(reference) - 3 > 0
    for got, expected in zip(rest, reference[3:]):
        assert got["keys"] == expected["keys"]
        assert torch.equal(got["pixel_values"], expected["pixel_values"])
        assert torch.equal(got["spatial_shapes"], expected["spatial_shapes"])


def test_a_changed_token_budget_refuses_an_exact_resume(shards, kit, tokenizer):
    saved = loaders(kit, tokenizer, shards, world=1)[0]
    take(saved, 2)
    other = loaders(kit, tokenizer, shards, world=1, budget=96)[0]
    assert not other.same_schedule(saved.state_dict())
    with pytest.raises(ValueError, match="token_budget"):
        other.load_state_dict(saved.state_dict())


def test_elastic_resume_on_other_workers_continues_the_step_lengths_and_sees_no_sample_twice(shards, kit, tokenizer):
    before = loaders(kit, tokenizer, shards, world=2, workers=1)
    seen = [k for loader in before for b in take(loader, 2) for k in b["keys"]]  # one step of 2 micro-batches
    states = [json.loads(json.dumps(loader.state_dict())) for loader in before]
    after = loaders(kit, tokenizer, shards, world=1, workers=2)  # another world size and worker count
    summary = after[0].load_elastic_state(states)
    # 4 micro-batches x 11/3 x 2 ranks left = 29.3 samples: 8 micro-batches of 11/3 on one rank (whole steps)
    assert summary["remaining_batches"] == 8
    rest = list(after[0])
    assert len(rest) == 8 and after[0].epoch == 1
    plan = schedule()
    offset = after[0].steps_per_epoch - 8  # the continued batches are the epoch's last 8 of this layout
    assert [b["pixel_values"].shape[1] for b in rest] == [plan.length(SEED, 0, offset + i) for i in range(8)]
    assert [len(b["keys"]) for b in rest] == [BUDGET // plan.length(SEED, 0, offset + i) for i in range(8)]
    seen += [k for b in rest for k in b["keys"]]
    assert after[0].repeated_samples() == 0
    assert max(Counter(seen).values()) == 1


@pytest.mark.parametrize("naflex, error", [
    ({"max_num_patches": 256, "token_budget": 200}, "token_budget' 200 is less than one image at the longest sequence length 256"),
    ({"sequence_lengths": [256, 576, 784], "token_budget": 700}, "token_budget' 700 is less than one image at the longest sequence length 784"),
    ({"sequence_lengths": []}, "sequence_lengths' is empty"),
    ({"sequence_lengths": [256, 0]}, "sequence_lengths' must be values >= 1"),
])
def test_a_token_budget_below_one_image_or_an_empty_length_list_is_one_sentence(naflex, error):
    with pytest.raises(ConfigError, match=error.replace("[", r"\[")):
        build(NaFlexConfig, naflex, "data.naflex", "run.yaml")
    assert build(NaFlexConfig, {"sequence_lengths": [256, 576, 784], "token_budget": 784 * 4}, "data.naflex", "run.yaml")


def test_a_changed_length_list_or_budget_is_a_layout_change_so_the_resume_continues_elastically():
    from mmcl.config import from_dict
    from mmcl.engine.elastic import compare, current_layout

    def layout(**naflex):
        vision = {"model_type": "siglip2_vision_model", "hidden_size": 32, "intermediate_size": 64,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "patch_size": 8, "num_patches": 16}
        text = {"model_type": "siglip2_text_model", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8}
        cfg = from_dict({"model": {"image": {"config": vision}, "text": {"config": text, "tokenizer": "unused-hub-id"},
                                   "logit_bias_init": -10.0},
                         "objectives": {"siglip": 1.0}, "train": {"micro_batch_size": 4, "grad_accum_steps": 2},
                         "data": {"train_shards": "unused.tar", "naflex": {"patch_size": 8, "max_num_patches": 16, **naflex}}})
        return current_layout(cfg, 2, 2)

    fixed, budget = layout(), layout(sequence_lengths=[8, 16], token_budget=32)
    assert fixed["global_batch"] == 4 * 2 * 2 and budget["global_batch"] == 3 * 2 * 2  # mean of 32 // 8, 32 // 16
    assert compare(budget, layout(sequence_lengths=[8, 16], token_budget=32), False) == []
    assert compare(budget, layout(sequence_lengths=[16, 8], token_budget=33), False) == [
        "data.naflex.sequence_lengths [8, 16] -> [16, 8]", "data.naflex.token_budget 32 -> 33"]
    assert compare(fixed, layout(sequence_lengths=[16]), False) == ["data.naflex.sequence_lengths None -> [16]"]
