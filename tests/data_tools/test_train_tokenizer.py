"""The tokenizer trainer: an AutoTokenizer folder that encodes like SentencePiece, deterministically."""

from __future__ import annotations

import json

import pytest

from data_tools.errors import DataToolsError
from data_tools.samples import SourceItem
from data_tools.train_tokenizer import captions_from_shards, main, train_tokenizer
from data_tools.write_shards import write_shards

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [
    t.format(w=w, n=n)
    for n, w in enumerate(WORDS)
    for t in ("a photo of the digit {w}.", "handwritten {n}", "the number {w} written by hand")
]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_trained_folder_loads_with_autotokenizer_and_round_trips(tmp_path, model_type):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    text = tmp_path / "captions.txt"
    text.write_text("\n".join(CAPTIONS * 5) + "\n\n")
    assert (
        main(
            [
                "--text",
                str(text),
                "--out",
                str(tmp_path / "tok"),
                "--model-type",
                model_type,
                "--vocab-size",
                "128",
                "--max-length",
                "16",
            ]
        )
        == 0
    )

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert tokenizer.model_max_length == 16
    caption = "a photo of the digit seven."
    ids = tokenizer(caption)["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and max(ids) < len(tokenizer)
    # Same ids as SentencePiece itself, between <s> and </s>.
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "sentencepiece.model"))
    assert ids[1:-1] == processor.encode(caption)
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption

    batch = tokenizer(["handwritten 7", caption], padding="max_length", max_length=16, truncation=True)
    short = batch["input_ids"][0]
    assert len(short) == 16 and short[short.index(3) + 1 :] == [0] * (16 - short.index(3) - 1)
    assert batch["attention_mask"][0] == [1] * (short.index(3) + 1) + [0] * (16 - short.index(3) - 1)


def test_same_captions_give_identical_files(tmp_path):
    first = train_tokenizer(CAPTIONS, tmp_path / "a", model_type="unigram", vocab_size=64)
    train_tokenizer(CAPTIONS, tmp_path / "b", model_type="unigram", vocab_size=64)
    for name in ("sentencepiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert first.requested_vocab_size == 64 and 20 < first.vocab_size <= 64  # small corpus: fewer pieces, no failure
    assert (
        json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )


def test_captions_come_from_shards_including_caption_lists(tmp_path, image_bytes):
    items = [
        SourceItem(source="a", image=image_bytes(), captions=("a photo of a cat",)),
        SourceItem(source="b", image=image_bytes(), captions=("two dogs", "dogs playing")),
    ]
    write_shards(items, tmp_path / "shards", samples_per_shard=1)
    assert captions_from_shards(f"{tmp_path}/shards/{{00000..00001}}.tar") == [
        "a photo of a cat",
        "two dogs",
        "dogs playing",
    ]
    assert (
        main(
            ["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "tok"), "--vocab-size", "40", "--lowercase"]
        )
        == 0
    )


def test_user_mistakes_are_one_sentence(tmp_path):
    with pytest.raises(DataToolsError, match=r"vocab size 10 is too small .* need at least \d+ pieces"):
        train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=10)
    with pytest.raises(DataToolsError, match="no captions to train on"):
        train_tokenizer(["", "  "], tmp_path / "tok")
    with pytest.raises(SystemExit) as failed:
        main(["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "tok")])
    assert "text file" in str(failed.value.code) and "does not exist" in str(failed.value.code)
    train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=64)
    with pytest.raises(DataToolsError, match="already holds a tokenizer; pass --overwrite"):
        train_tokenizer(CAPTIONS, tmp_path / "tok", vocab_size=64)


def test_malformed_captions_are_left_out_and_counted(tmp_path, image_bytes, capsys):
    import io
    import tarfile

    members = [("0.jpg", image_bytes()), ("0.txt", b"a photo of a cat"), ("1.jpg", image_bytes()),
               ("1.txt", b"[" * 5000 + b"]" * 5000), ("2.jpg", image_bytes()), ("2.txt", b"\xff\xfe"),
               ("3.jpg", image_bytes()), ("3.txt", b"dogs " * 20_000), ("4.jpg", image_bytes()),
               ("4.txt", b'["two dogs", "dogs playing"]')]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    from collections import Counter

    skipped = Counter()
    assert captions_from_shards(str(tmp_path / "shards"), skipped) == ["a photo of a cat", "two dogs", "dogs playing"]
    assert skipped == {"bad_caption": 1, "bad_caption_encoding": 1, "caption_too_large": 1}
    assert main(["--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "tok"), "--vocab-size", "40"]) == 0
    captured = capsys.readouterr()
    assert "skipped 3 caption members (bad_caption=1, bad_caption_encoding=1, caption_too_large=1)" in captured.err
    assert json.loads(captured.out)["skipped"] == {"bad_caption": 1, "bad_caption_encoding": 1, "caption_too_large": 1}
