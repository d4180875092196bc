"""`mmcl-train-tokenizer --siglip2`: a Gemma-style Siglip2Tokenizer (lowercased byte pairs, Gemma's ids, left padding)
that mmcl keeps padding on the left, so a from-scratch SigLIP 2 text head reads each caption's last piece."""
from __future__ import annotations

import json

from data_tools.train_tokenizer import main

CAPTIONS = [t.format(w=w, n=n) for n, w in enumerate(["zero", "one", "two", "three", "seven"])
            for t in ("A photo of the digit {w}.", "handwritten {n}", "the number {w} written by hand")]


def train(tmp_path, name: str = "tok") -> str:
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(CAPTIONS * 4) + "\n")
    assert main(["--text", str(text), "--out", str(tmp_path / name), "--siglip2", "--vocab-size", "90",
                 "--max-length", "12"]) == 0
    return str(tmp_path / name)


def test_siglip2_tokenizer_loads_as_siglip2tokenizer_lowercased_with_gemma_ids(tmp_path, capsys):
    from transformers import AutoTokenizer

    folder = train(tmp_path)
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["pad_token_id"], info["eos_token_id"], info["bos_token_id"], info["unk_token_id"]) \
        == ("siglip2-bpe", 0, 1, 2, 3) and info["vocab_size"] <= 90
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(tokenizer).__name__ == "Siglip2Tokenizer" and tokenizer.padding_side == "left"
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    ids = tokenizer("A Photo of the digit SEVEN.")["input_ids"]
    assert tokenizer.decode(ids) == "a photo of the digit seven."
    assert "▁photo" in tokenizer.convert_ids_to_tokens(ids) and 3 not in ids  # whole words learnt, nothing unknown
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == open(train(tmp_path, "again") + "/tokenizer.json", "rb").read()


def test_mmcl_pads_a_siglip2_tokenizer_on_the_left_so_the_last_position_is_the_last_piece(tmp_path):
    from mmcl.config import TextTowerConfig
    from mmcl.models import build_tokenizer, tokenize

    tokenizer = build_tokenizer(TextTowerConfig(tokenizer=train(tmp_path), context_length=12))
    tokens = tokenize(tokenizer, ["handwritten 3", "the number seven written by hand"], 12)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == (2, 12) and mask[:, -1].tolist() == [1, 1] and mask[0, 0] == 0 and ids[0, 0] == 0
    assert tokenizer.convert_ids_to_tokens(ids[:, -1].tolist()) == ["▁3", "▁hand"]


def test_a_siglip2_text_tower_is_padded_on_the_left_whatever_its_tokenizer_and_other_towers_on_the_right(tmp_path):
    """SigLIP 2's text head reads the last position: with a right-padding tokenizer (here a BERT WordPiece)
    it would read padding, so mmcl pads on the left for a siglip2_text_model tower; a BERT tower stays right."""
    from transformers import BertTokenizer

    from mmcl.config import TextTowerConfig
    from mmcl.models import build_tokenizer, tokenize

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    siglip2 = build_tokenizer(TextTowerConfig(config={"model_type": "siglip2_text_model"}, tokenizer=str(tmp_path / "bert"),
                                              context_length=8))
    bert = build_tokenizer(TextTowerConfig(config={"model_type": "bert"}, tokenizer=str(tmp_path / "bert"), context_length=8))
    assert (siglip2.padding_side, bert.padding_side) == ("left", "right")
    left, right = (tokenize(t, ["a cat"], 8)["input_ids"][0].tolist() for t in (siglip2, bert))
    assert left == [0, 0, 0, 0, 2, 5, 6, 3] and right == [2, 5, 6, 3, 0, 0, 0, 0]  # the last position: [SEP], not padding
