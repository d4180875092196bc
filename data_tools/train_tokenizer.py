"""Train a SentencePiece tokenizer on captions and save it as a `transformers` tokenizer folder.

    mmcl-train-tokenizer --shards 'out/{00000..00003}.tar' --out tokenizer/ [--model-type unigram|bpe] [--vocab-size 8000]
    mmcl-train-tokenizer --text captions.txt --out tokenizer/

The folder holds `tokenizer.json` + `tokenizer_config.json` (loaded offline by
`AutoTokenizer.from_pretrained(folder)` as a fast tokenizer) and the SentencePiece model
`sentencepiece.model`. Ids: <pad>=0, <unk>=1, <s>=2, </s>=3; every encoded text is
`<s> ... </s>`, so a text tower can pool at the first token or at the end-of-text token.
Training is single-threaded by default so the same captions give the same files.

    mmcl-train-tokenizer --shards 'out/{00000..00003}.tar' --out tokenizer/ --siglip2 [--vocab-size 8000]

`--siglip2` makes a Gemma-style tokenizer for a from-scratch SigLIP 2 text tower instead: byte-pair
pieces learnt on the lowercased captions (words start with `▁`, as in Gemma), saved as
`transformers`' `Siglip2Tokenizer` (`tokenizer.json`; AutoTokenizer loads that class), with Gemma's
ids <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, lowercasing, no <bos>/<eos> added, and padding on
the **left**, so SigLIP 2's text head (the last position) reads each caption's last piece.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from mmcl.data.decode import DEFAULT_MAX_TEXT_BYTES, BadSample, caption_list, member_bytes

from .errors import DataToolsError
from .shard_reader import ShardError, expand_urls, iter_samples, require_shards

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
SPM_FILE = "sentencepiece.model"  # not `tokenizer.model`: transformers reads that name as tiktoken


@dataclass
class TokenizerInfo:
    """What was trained: model type, requested and actual vocabulary size, number of captions."""

    out_dir: str
    model_type: str
    vocab_size: int
    requested_vocab_size: int
    sentences: int
    pad_token_id: int = PAD_ID
    unk_token_id: int = UNK_ID
    bos_token_id: int = BOS_ID
    eos_token_id: int = EOS_ID
    skipped: dict[str, int] = field(default_factory=dict)  # caption members left out, by reason


def captions_from_shards(specs: str | list[str], skipped: Counter | None = None,
                         max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> list[str]:
    """Every caption in the `.txt` members of a shard set (all of them for JSON-list captions).

    A shard that cannot be opened is an error; a truncated one contributes what it holds. A
    caption member the training pipeline would skip (not UTF-8, empty, undecodable JSON, above
    `max_text_bytes`, then not even read) is left out and counted by reason in `skipped`.
    """
    captions: list[str] = []
    skipped = Counter() if skipped is None else skipped
    for url in require_shards(expand_urls(specs), specs):
        try:
            for _, fields in iter_samples(url, lambda ext: max_text_bytes if ext == "txt" else None):
                if "txt" in fields:
                    try:
                        captions.extend(caption_list(member_bytes(fields["txt"], "txt")))
                    except BadSample as error:
                        skipped[error.reason] += 1
        except ShardError as error:
            if error.kind == "unreadable":
                raise DataToolsError(
                    f"shard {url} cannot be read ({error.detail}); check the pattern or run mmcl-inspect-shards."
                ) from None
            print(
                f"warning: shard {url} is {error.kind} ({error.detail}); using the captions before the damage",
                file=sys.stderr,
            )
    return captions


def captions_from_text(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, one caption per line."""
    path = Path(path)
    if not path.is_file():
        raise DataToolsError(f"text file {path} does not exist; pass a file with one caption per line.")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_sentencepiece(
    captions: Iterable[str],
    model_type: str = "unigram",
    vocab_size: int = 8000,
    lowercase: bool = False,
    character_coverage: float = 1.0,
    max_sentences: int = 0,
    byte_fallback: bool = False,
    threads: int = 1,
    seed: int = 0,
) -> bytes:
    """Train SentencePiece in memory; returns the serialized model.

    `vocab_size` is an upper bound (`hard_vocab_limit=False`), so small corpora do not fail.
    `max_sentences` > 0 trains on a seeded sample of that many captions. More than one
    thread is faster but not guaranteed to give identical models run to run.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataToolsError(f"model type {model_type!r} is not one of {', '.join(MODEL_TYPES)}.")
    sentences = [" ".join(c.split()) for c in captions if c and c.strip()]  # one line each
    if not sentences:
        raise DataToolsError("no captions to train on; the shards have no .txt members or the text file is empty.")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            character_coverage=character_coverage,
            normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            input_sentence_size=max_sentences,
            shuffle_input_sentence=max_sentences > 0,
            byte_fallback=byte_fallback,
            split_digits=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=SPECIAL_TOKENS["pad_token"],
            unk_piece=SPECIAL_TOKENS["unk_token"],
            bos_piece=SPECIAL_TOKENS["bos_token"],
            eos_piece=SPECIAL_TOKENS["eos_token"],
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(error))
        if too_small:
            raise DataToolsError(
                f"vocab size {too_small[1]} is too small for these captions, which need at least {too_small[2]} pieces "
                "(every character plus the special tokens); raise --vocab-size or lower --character-coverage."
            ) from None
        detail = str(error).split("] ", 1)[-1].strip() or str(error)
        raise DataToolsError(f"SentencePiece could not train on {len(sentences)} captions: {detail}") from None
    return model.getvalue()


def save_transformers_tokenizer(spm_model: bytes, out_dir: str | Path, max_length: int = 77) -> int:
    """Wrap a SentencePiece model as a fast `transformers` tokenizer in `out_dir`; returns the vocab size.

    The backend is built by transformers' own SentencePiece converter (the same code that
    loads a bare `.model` file), which encodes exactly like SentencePiece, and gets a
    post-processor that adds <s> and </s>.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.convert_slow_tokenizer import SpmConverter

        build = SpmConverter.build_tokenizer_from_spm_proto
    except (ImportError, AttributeError):
        raise DataToolsError(
            "saving the tokenizer needs transformers>=5 (SpmConverter.build_tokenizer_from_spm_proto); upgrade transformers."
        ) from None

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    if proto.trainer_spec.model_type == 1:  # unigram: pieces with scores
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    else:  # bpe: piece -> id; merges are rebuilt from the piece scores
        vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    # legacy=True follows SentencePiece exactly, also for text with leading spaces.
    backend = build(proto, vocab, legacy=True)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}", special_tokens=[(bos, BOS_ID), (eos, EOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, **SPECIAL_TOKENS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / SPM_FILE).write_bytes(spm_model)
    # transformers 5 names the class TokenizersBackend; PreTrainedTokenizerFast is its alias
    # there and the class 4.x knows, so the folder loads under both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return len(proto.pieces)


def train_tokenizer(
    captions: Iterable[str],
    out_dir: str | Path,
    model_type: str = "unigram",
    vocab_size: int = 8000,
    max_length: int = 77,
    lowercase: bool = False,
    character_coverage: float = 1.0,
    max_sentences: int = 0,
    byte_fallback: bool = False,
    threads: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> TokenizerInfo:
    """Train on `captions` and save an `AutoTokenizer`-loadable folder at `out_dir`."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists() and not overwrite:
        raise DataToolsError(
            f"{out_dir} already holds a tokenizer; pass --overwrite to replace it or choose another --out."
        )
    captions = list(captions)
    model = train_sentencepiece(
        captions, model_type, vocab_size, lowercase, character_coverage, max_sentences, byte_fallback, threads, seed
    )
    actual = save_transformers_tokenizer(model, out_dir, max_length)
    return TokenizerInfo(str(out_dir), model_type, actual, vocab_size, len(captions))


SIGLIP2_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # Gemma's ids 0..4


def train_siglip2_tokenizer(
    captions: Iterable[str], out_dir: str | Path, vocab_size: int = 8000, max_length: int = 64, overwrite: bool = False
) -> TokenizerInfo:
    """Learn byte-pair pieces on `captions` and save a `Siglip2Tokenizer` folder (see the module docstring).

    Training splits before each `▁` (word start), so no learnt merge spans two words and the saved
    tokenizer, which applies the merges to the whole caption as Siglip2Tokenizer does, encodes alike.
    """
    import json as _json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.siglip2.tokenization_siglip2 import Siglip2Tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").exists() and not overwrite:
        raise DataToolsError(f"{out_dir} already holds a tokenizer; pass --overwrite to replace it or choose another --out.")
    captions = [caption for caption in captions if caption.strip()]
    if not captions:
        raise DataToolsError("no captions to train the tokenizer on; check --shards / --text.")
    trainer_tokenizer = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    trainer_tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    alphabet = sorted(set("".join(captions).lower().replace(" ", "▁")))
    trainer_tokenizer.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SIGLIP2_SPECIALS, initial_alphabet=alphabet, show_progress=False))
    model = _json.loads(trainer_tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Siglip2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return TokenizerInfo(str(out_dir), "siglip2-bpe", len(model["vocab"]), vocab_size, len(captions),
                         pad_token_id=0, unk_token_id=3, bos_token_id=2, eos_token_id=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl-train-tokenizer", description="Train a SentencePiece tokenizer on captions for AutoTokenizer."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--shards",
        metavar="PATTERN",
        nargs="+",
        help="shard patterns like 'out/{00000..00003}.tar' (their .txt captions)",
    )
    source.add_argument("--text", metavar="FILE", help="text file with one caption per line")
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder for the tokenizer")
    parser.add_argument(
        "--model-type", choices=MODEL_TYPES, default="unigram", help="SentencePiece algorithm (default unigram)"
    )
    parser.add_argument(
        "--vocab-size",
        metavar="N",
        type=int,
        default=8000,
        help="largest vocabulary size; small corpora get fewer pieces (default 8000)",
    )
    parser.add_argument(
        "--max-length", metavar="N", type=int, default=77, help="model_max_length saved with the tokenizer (default 77)"
    )
    parser.add_argument("--lowercase", action="store_true", help="case-fold text (nmt_nfkc_cf normalization)")
    parser.add_argument(
        "--character-coverage", metavar="F", type=float, default=1.0, help="share of characters covered (default 1.0)"
    )
    parser.add_argument(
        "--max-sentences",
        metavar="N",
        type=int,
        default=0,
        help="train on a seeded sample of this many captions (0: all)",
    )
    parser.add_argument(
        "--byte-fallback", action="store_true", help="unknown characters become byte pieces (adds 256 pieces)"
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=int,
        default=1,
        help="training threads; more than 1 may change the model run to run",
    )
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="random seed for sampling (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --out")
    parser.add_argument("--siglip2", action="store_true",
                        help="a Gemma-style Siglip2Tokenizer (byte-pair, lowercased, padded on the left) for a "
                             "from-scratch SigLIP 2 text tower; --model-type, --lowercase, --character-coverage, "
                             "--byte-fallback, --max-sentences and --threads do not apply")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`mmcl-train-tokenizer`)."""
    args = build_parser().parse_args(argv)
    try:
        if args.vocab_size < 8:
            raise DataToolsError(f"vocab size must be at least 8, got {args.vocab_size}.")
        skipped: Counter = Counter()
        captions = captions_from_shards(args.shards, skipped) if args.shards else captions_from_text(args.text)
        if skipped:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items()))
            print(f"warning: skipped {sum(skipped.values())} caption members ({counts})", file=sys.stderr)
        if args.siglip2:
            info = train_siglip2_tokenizer(captions, args.out, args.vocab_size, args.max_length, args.overwrite)
            info.skipped = dict(sorted(skipped.items()))
            print(json.dumps(asdict(info), indent=2))
            return 0
        info = train_tokenizer(
            captions,
            args.out,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            max_length=args.max_length,
            lowercase=args.lowercase,
            character_coverage=args.character_coverage,
            max_sentences=args.max_sentences,
            byte_fallback=args.byte_fallback,
            threads=args.threads,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except DataToolsError as error:
        raise SystemExit(f"mmcl-train-tokenizer: error: {error}") from None
    info.skipped = dict(sorted(skipped.items()))
    print(json.dumps(asdict(info), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
