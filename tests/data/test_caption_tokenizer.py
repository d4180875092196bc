import torch

from mmcl.data.tokenize import CaptionTokenizer


def test_transformers_tokenizer_pads_and_truncates(tokenizer):
    ids, mask = CaptionTokenizer(tokenizer, 6)(["a photo of the cat dog red", "cat"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape == (2, 6)
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    words = tokenizer.convert_tokens_to_ids(["a", "photo", "of", "the", "cat"])
    assert ids[0].tolist() == [cls, *words[:4], sep]  # truncated, special tokens kept
    assert ids[1].tolist() == [cls, words[4], sep, pad, pad, pad]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_plain_callable_returning_lists_or_tensors():
    ids, mask = CaptionTokenizer(lambda texts: [[5] * len(t) for t in texts], 4)(["ab", "abcdef"])
    assert ids.tolist() == [[5, 5, 0, 0], [5, 5, 5, 5]] and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]

    def openclip_style(texts):  # [B, 6] already padded with 0
        out = torch.zeros(len(texts), 6, dtype=torch.long)
        for i, t in enumerate(texts):
            out[i, : len(t)] = 7
        return out

    ids, mask = CaptionTokenizer(openclip_style, 3)(["a", "abcd"])
    assert ids.tolist() == [[7, 0, 0], [7, 7, 7]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    ids, mask = CaptionTokenizer(openclip_style, 8)(["ab"])
    assert ids.tolist() == [[7, 7, 0, 0, 0, 0, 0, 0]] and mask.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer):
    class NoPad:
        pad_token_id = None
        eos_token_id = 9
        model_max_length = 512
        padding_side = "left"

        def __call__(self, texts, truncation=True, max_length=None):
            return {"input_ids": [[1, 2, 3, 4, 5][: max_length][: len(t)] for t in texts]}

    ids, mask = CaptionTokenizer(NoPad(), 4)(["ab", "abcdef"])
    assert ids.tolist() == [[9, 9, 1, 2], [1, 2, 3, 4]] and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
