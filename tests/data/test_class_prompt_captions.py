"""FLYP's captions: a labelled sample is captioned with a prompt of its class, drawn per
(seed, epoch, key) alone, so any rank layout and a resume see the same captions."""
from collections import Counter

import pytest

from mmcl.data import build_train_loader
from mmcl.data.class_prompts import ClassPrompts
from mmcl.evaluation.prompts import expand_prompts

CLASSNAMES = ["cat", "dog", "car", "tree", "red", "blue", "sample"]  # the 7 labels of write_dataset (seed % 7)
TEMPLATES = ["a photo of the {}", "the {}", "a {} number", "photo of a {}"]


def prompts(seed: int = 0) -> ClassPrompts:
    return ClassPrompts.from_lists(*expand_prompts(CLASSNAMES, TEMPLATES), seed=seed)


def captions_by_key(loader, tokenizer, epochs: int = 1) -> list[dict[str, str]]:
    """Per epoch: sample key -> the decoded caption the model would see."""
    out = []
    for _ in range(epochs):
        seen = {}
        for batch in loader:
            texts = tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
            seen.update(zip(batch["keys"], texts))
        out.append(seen)
    return out


def test_labelled_samples_get_a_prompt_of_their_class_instead_of_their_txt(tmp_path, kit, tokenizer):
    pattern, keys = kit.write_dataset(tmp_path, 2, 14, labels=True)
    loader = build_train_loader(kit.data_config(pattern), tokenizer, 8, batch_size=4, seed=0,
                                rank=0, world_size=1, class_prompts=prompts())
    (seen,) = captions_by_key(loader, tokenizer)
    assert len(seen) == 28
    for key, caption in seen.items():
        shard, index = int(key[:3]), int(key[3:])
        name = CLASSNAMES[(shard * 1000 + index) % 7]
        assert caption in {t.replace("{}", name) for t in TEMPLATES}, (key, caption)
    assert len(Counter(c.split(" ")[0] for c in seen.values())) > 1  # several templates drawn


def test_the_prompt_depends_on_seed_epoch_and_key_only(tmp_path, kit, tokenizer):
    pattern, _ = kit.write_dataset(tmp_path, 4, 6, labels=True)
    cfg = kit.data_config(pattern, num_workers=2)
    one = captions_by_key(build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, rank=0, world_size=1,
                                             class_prompts=prompts()), tokenizer, epochs=2)
    two = [{}, {}]
    for rank in (0, 1):  # another layout: two ranks, another batch size and worker count
        loader = build_train_loader(kit.data_config(pattern, num_workers=1), tokenizer, 8, batch_size=3, seed=0,
                                    rank=rank, world_size=2, class_prompts=prompts())
        for epoch, seen in enumerate(captions_by_key(loader, tokenizer, epochs=2)):
            two[epoch].update(seen)
    assert one == two
    changed = [key for key in one[0] if one[0][key] != one[1][key]]
    assert len(changed) > len(one[0]) // 2  # a new draw each epoch (1/4 chance of the same template)
    reseeded = captions_by_key(build_train_loader(cfg, tokenizer, 8, batch_size=2, seed=0, rank=0, world_size=1,
                                                  class_prompts=prompts(seed=1)), tokenizer)[0]
    assert reseeded != one[0]


def test_samples_without_a_usable_label_are_skipped_and_counted(tmp_path, kit, tokenizer):
    samples = [kit.good_sample(f"k{i}", i, label=i % 7) for i in range(8)]
    samples += [kit.good_sample("nolabel", 100)]  # no .cls
    samples += [kit.good_sample("beyond", 101, label=7)]  # no class name for label 7
    kit.write_shard(tmp_path / "0.tar", samples)
    loader = build_train_loader(kit.data_config(str(tmp_path / "0.tar")), tokenizer, 8, batch_size=4, seed=0,
                                rank=0, world_size=1, exhaust=True, class_prompts=prompts())
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(f"k{i}" for i in range(8))
    assert loader.skip_counts() == {"missing_label": 1, "bad_label": 1}


def test_class_prompts_refuse_a_class_without_prompts():
    with pytest.raises(ValueError, match="class 1 has none"):
        ClassPrompts((("a cat",), ()))
