import random
import shutil

import pytest
import sentencepiece
import torch
import transformers

from mmcl.config import TextTowerConfig
from mmcl.models import TokenizerLoadError, build_model, build_tokenizer, check_tokenizer_fits, tokenize

from .tiny import TEXT_CONFIGS, model_config

WORDS = "a photo of the cat dog bird car red blue green small big on in with".split()


def _text_cfg(tokenizer_dir) -> TextTowerConfig:
    return TextTowerConfig(config=dict(TEXT_CONFIGS["bert"]), tokenizer=str(tokenizer_dir))


@pytest.fixture
def wordpiece_dir(tmp_path):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast.from_pretrained(str(vocab)).save_pretrained(tmp_path / "wordpiece")
    return tmp_path / "wordpiece"


def test_wordpiece_tokenizer_pads_and_masks(wordpiece_dir):
    tokenizer = build_tokenizer(_text_cfg(wordpiece_dir))
    batch = tokenize(tokenizer, ["a photo of the cat", "dog"], context_length=8)
    ids = {w: 5 + i for i, w in enumerate(WORDS)}
    cls, sep, pad = 2, 3, 0
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [
        [cls, ids["a"], ids["photo"], ids["of"], ids["the"], ids["cat"], sep, pad],
        [cls, ids["dog"], sep, pad, pad, pad, pad, pad],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0], [1] * 3 + [0] * 5]


def test_truncation_keeps_the_closing_special_token(wordpiece_dir):
    tokenizer = build_tokenizer(_text_cfg(wordpiece_dir))
    batch = tokenize(tokenizer, " ".join(WORDS), context_length=6)
    assert batch["input_ids"].shape == (1, 6) and batch["input_ids"][0, -1].item() == 3
    assert batch["attention_mask"].tolist() == [[1] * 6]


def _train_sentencepiece(prefix, model_type: str, **ids) -> str:
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(48)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=60, hard_vocab_limit=False,
        model_type=model_type, minloglevel=2, **ids,
    )
    return f"{prefix}.model"


SENTENCEPIECE = {
    # class: (sentencepiece model type, special ids, extra constructor options)
    "T5Tokenizer": ("unigram", dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1), dict(extra_ids=0)),
    "XLMRobertaTokenizer": ("unigram", dict(bos_id=0, pad_id=1, eos_id=2, unk_id=3), {}),
    "LlamaTokenizer": ("bpe", dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1), {}),  # no pad token
}


@pytest.mark.parametrize("class_name", sorted(SENTENCEPIECE))
def test_sentencepiece_tokenizer_loads_pads_and_round_trips(tmp_path, class_name):
    model_type, special_ids, options = SENTENCEPIECE[class_name]
    cls = getattr(transformers, class_name)
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(_train_sentencepiece(tmp_path / "sp", model_type, **special_ids), raw / cls.vocab_files_names["vocab_file"])
    cls.from_pretrained(str(raw), **options).save_pretrained(tmp_path / "tokenizer")

    tokenizer = build_tokenizer(_text_cfg(tmp_path / "tokenizer"))
    assert type(tokenizer).__name__ == class_name
    sentence = "a small dog with the red car"
    unpadded = tokenizer(sentence)["input_ids"]
    assert tokenizer.unk_token_id not in unpadded
    batch = tokenize(tokenizer, [sentence, "cat"], context_length=len(unpadded) + 4)
    assert batch["input_ids"].shape == (2, len(unpadded) + 4)
    assert batch["input_ids"][0].tolist() == unpadded + [tokenizer.pad_token_id] * 4
    assert batch["attention_mask"][0].tolist() == [1] * len(unpadded) + [0] * 4
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).strip() == sentence
    if class_name == "LlamaTokenizer":
        assert tokenizer.pad_token == tokenizer.eos_token  # the documented fallback


def test_missing_tokenizer_names_the_key(tmp_path):
    missing = str(tmp_path / "no_tokenizer")
    with pytest.raises(TokenizerLoadError) as caught:
        build_tokenizer(_text_cfg(missing))
    message = str(caught.value)
    assert message.startswith(f"'model.text.tokenizer' = '{missing}' could not be loaded as a tokenizer")
    assert message.endswith(".") and "\n" not in message


def test_tokenizer_larger_than_the_vocabulary_is_refused(wordpiece_dir):
    tokenizer = build_tokenizer(_text_cfg(wordpiece_dir))  # 21 tokens
    check_tokenizer_fits(tokenizer, build_model(model_config(text="bert")).text_tower)  # vocab_size 100
    cfg = model_config(text="bert")
    cfg.text.config["vocab_size"] = 10
    with pytest.raises(ValueError, match=r"has 21 tokens but the text tower's vocab_size is 10; set 'model.text.config.vocab_size'"):
        check_tokenizer_fits(tokenizer, build_model(cfg).text_tower)


def test_tokenized_captions_encode_to_unit_features(wordpiece_dir):
    model = build_model(model_config(text="bert")).eval()
    batch = tokenize(build_tokenizer(_text_cfg(wordpiece_dir)), ["a red car", "the small bird on a car"], 12)
    features = model.encode_text(**batch)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
