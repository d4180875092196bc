"""The offline digits demo dataset: splits, counts, class names, templates, tokenizer, verification."""

from __future__ import annotations

import json
import re

import pytest

from data_tools import inspect_shards
from data_tools.demo_dataset import build_demo, main
from data_tools.errors import DataToolsError
from data_tools.shard_reader import expand_urls, iter_samples


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--out", str(out)]) == 0
    return out


def test_splits_cover_all_digits_once(demo):
    info = json.loads((demo / "info.json").read_text())
    splits = info["splits"]
    assert (splits["train"]["samples"], splits["val"]["samples"], splits["classification"]["samples"]) == (
        1437,
        360,
        360,
    )
    assert splits["train"]["samples"] + splits["val"]["samples"] == 1797
    assert splits["train"]["urls"] == "train/{00000..00002}.tar"  # what configs/demo.yaml reads
    assert splits["val"]["urls"] == "val/00000.tar"
    # Stratified: every class is about 20% held out.
    for train_count, held_out in zip(splits["train"]["per_class"], splits["val"]["per_class"]):
        assert abs(held_out / (train_count + held_out) - 0.2) < 0.02
    sources = {split: set() for split in ("train", "val", "classification")}
    for split in sources:
        for url in expand_urls(str(demo / info["splits"][split]["urls"])):
            for _, fields in iter_samples(url):
                sources[split].add(json.loads(fields["json"])["source"])
    assert len(sources["train"]) == 1437 and not sources["train"] & sources["val"]
    assert sources["val"] == sources["classification"]


def test_captions_classnames_and_templates_fit_together(demo):
    classnames = (demo / "classification" / "classnames.txt").read_text().splitlines()
    assert classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = json.loads((demo / "classification" / "templates.json").read_text())
    assert len(templates) >= 3 and all(t.count("{}") == 1 for t in templates)

    captions, labels = [], []
    for url in expand_urls(str(demo / "train")):
        for _, fields in iter_samples(url):
            assert fields["png"].startswith(b"\x89PNG")
            captions.append(fields["txt"].decode())
            labels.append(int(fields["cls"]))
    # Captions name the right digit, as a word or a numeral, in several phrasings.
    for caption, label in zip(captions, labels):
        assert re.search(rf"\b({classnames[label]}|{label})\b", caption), caption
    assert len({re.sub(r"\b(\d|" + "|".join(classnames) + r")\b", "#", c) for c in captions}) >= 6
    # Every zero-shot prompt, filled with a class name, is a training caption.
    for template in templates:
        assert template.format("seven") in captions


def test_tokenizer_loads_and_encodes_prompts_without_unknowns(demo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "tokenizer")
    info = json.loads((demo / "info.json").read_text())
    assert len(tokenizer) == info["tokenizer"]["vocab_size"] <= 256
    ids = tokenizer("a photo of the digit seven.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) <= 16


def test_inspect_verifies_every_split(demo):
    for split in ("train", "val"):
        assert inspect_shards.main([str(demo / split)]) == 0
    assert inspect_shards.main([str(demo / "classification"), "--strict"]) == 0


def test_rerun_is_a_no_op_and_other_options_need_force(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()}
    assert main(["--out", str(demo)]) == 0
    assert "is complete; nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()} == before
    with pytest.raises(DataToolsError, match=r"built with other options: image_size 32 \(asked 16\); pass --force"):
        build_demo(demo, image_size=16)
