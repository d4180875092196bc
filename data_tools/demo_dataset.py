"""The demo dataset: scikit-learn's handwritten digits as image-caption shards, built offline in seconds.

    mmcl-demo-data --out data/demo [--image-size 32] [--seed 0] [--force]

`sklearn.datasets.load_digits()` ships 1,797 real 8x8 scans of handwritten digits inside
the package. They are upscaled (bicubic) to RGB PNGs, split stratified into train (80%) and
held-out (20%), and written as:

    train/           shards with a caption per image (varied phrasings, word or numeral) + .cls
    val/             held-out images with captions + .cls, for retrieval
    classification/  the same held-out images with .cls, classnames.txt and templates.json
    tokenizer/       SentencePiece tokenizer trained on the train captions (AutoTokenizer folder)
    info.json        options, counts and shard patterns; README.md says the same in words

Everything follows from the options, so a rebuild gives the same bytes; an output that is
already complete with the same options is left alone unless `--force`. A rebuild removes only
the names above, and only in a folder this tool wrote (its info.json, or the `.mmcl-demo-building`
marker of a build that was stopped); other folders are refused.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
from collections import Counter
from pathlib import Path

from .errors import DataToolsError
from .samples import SourceItem
from .sources import Source
from .train_tokenizer import train_tokenizer
from .write_shards import write_shards

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Caption templates: {word} is the class name, {numeral} the digit; both kinds are used so the
# text tower has to learn that "7" and "seven" mean the same thing.
CAPTION_TEMPLATES = [
    "a photo of the digit {word}.",
    "handwritten {numeral}",
    "the number {word} written by hand",
    "a scan of a handwritten {numeral}",
    "a blurry image of the digit {word}",
    "a small grayscale picture of a {word}",
    "the digit {numeral}, written by hand",
    "a scan of a handwritten {word}",
    "a low resolution photo of the number {numeral}",
    "a handwritten {word} on white paper",
]
# Zero-shot prompts: only phrasings that occur in the training captions with the word.
ZERO_SHOT_TEMPLATES = [
    "a photo of the digit {}.",
    "the number {} written by hand",
    "a blurry image of the digit {}",
    "a small grayscale picture of a {}",
    "a scan of a handwritten {}",
    "a handwritten {} on white paper",
]
SPLITS = ("train", "val", "classification")
FORMAT_VERSION = 1
DATASET_NAME = "mmcl digits demo"  # info.json's "name": what marks a folder as this tool's
BUILDING = ".mmcl-demo-building"  # present from the first file of a build until info.json is written


def digit_png(pixels, image_size: int) -> bytes:
    """An 8x8 digits array (0..16, 16 = ink) as a dark-on-white RGB PNG of `image_size` pixels."""
    import numpy as np
    from PIL import Image

    gray = np.round(255.0 - pixels * (255.0 / 16.0)).clip(0, 255).astype("uint8")
    image = Image.fromarray(gray).resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption_for(label: int, rng: random.Random) -> str:
    """One caption for a digit, a template drawn from `rng`."""
    template = CAPTION_TEMPLATES[rng.randrange(len(CAPTION_TEMPLATES))]
    return template.format(word=CLASSNAMES[label], numeral=label)


def split_indices(labels, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified, seeded train / held-out split of sample indices."""
    from sklearn.model_selection import train_test_split

    train, held_out = train_test_split(
        list(range(len(labels))), test_size=val_fraction, stratify=labels, random_state=seed
    )
    return [int(i) for i in train], [int(i) for i in held_out]


def _shard_pattern(split: str, shards: int) -> str:
    return f"{split}/{{00000..{shards - 1:05d}}}.tar" if shards > 1 else f"{split}/00000.tar"


def demo_options(
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
    samples_per_shard: int = 500,
    vocab_size: int = 256,
    tokenizer_type: str = "bpe",
) -> dict:
    """The options recorded in info.json; a build with equal options is the same build."""
    return {
        "image_size": image_size,
        "seed": seed,
        "val_fraction": val_fraction,
        "samples_per_shard": samples_per_shard,
        "vocab_size": vocab_size,
        "tokenizer_type": tokenizer_type,
        "format_version": FORMAT_VERSION,
    }


def is_complete(out_dir: str | Path, options: dict) -> bool:
    """True when info.json records these options and every file it lists exists.

    Raises `DataToolsError` when a complete-looking build used other options, rather than
    silently replacing it.
    """
    out_dir = Path(out_dir)
    info_path = out_dir / "info.json"
    if not info_path.is_file():
        return False
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    built = info.get("options") or {}
    if built != options:
        differences = ", ".join(
            f"{key} {built.get(key)!r} (asked {value!r})" for key, value in options.items() if built.get(key) != value
        )
        raise DataToolsError(
            f"{out_dir} holds a demo dataset built with other options: {differences}; pass --force to rebuild it."
        )
    return all((out_dir / name).is_file() for name in info.get("files", []))


def build_demo(
    out_dir: str | Path,
    image_size: int = 32,
    seed: int = 0,
    val_fraction: float = 0.2,
    samples_per_shard: int = 500,
    vocab_size: int = 256,
    tokenizer_type: str = "bpe",
    force: bool = False,
) -> dict:
    """Build (or find complete) the demo dataset in `out_dir`; returns the contents of info.json."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise DataToolsError(f"image size must be at least 8 (the digits are 8x8), got {image_size}.")
    if not 0.0 < val_fraction < 1.0:
        raise DataToolsError(f"held-out fraction must be between 0 and 1, got {val_fraction}.")
    out_dir = Path(out_dir)
    options = demo_options(image_size, seed, val_fraction, samples_per_shard, vocab_size, tokenizer_type)
    if not force and is_complete(out_dir, options):
        return json.loads((out_dir / "info.json").read_text(encoding="utf-8"))
    _clear_previous_build(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUILDING).write_text("mmcl-demo-data is writing this folder\n", encoding="utf-8")

    digits = load_digits()
    labels = [int(y) for y in digits.target]
    train_ids, held_out_ids = split_indices(labels, val_fraction, seed)
    images = {i: digit_png(digits.images[i], image_size) for i in (*train_ids, *held_out_ids)}
    train_rng, val_rng = random.Random(seed), random.Random(seed + 1)
    train_captions = {i: caption_for(labels[i], train_rng) for i in train_ids}
    val_captions = {i: caption_for(labels[i], val_rng) for i in held_out_ids}

    def items(ids: list[int], captions: dict[int, str] | None) -> list[SourceItem]:
        return [
            SourceItem(
                source=f"sklearn_digits[{i}]",
                image=images[i],
                captions=(captions[i] if captions else CLASSNAMES[labels[i]],),
                label=labels[i],
            )
            for i in ids
        ]

    written = {
        "train": write_shards(items(train_ids, train_captions), out_dir / "train", samples_per_shard=samples_per_shard),
        "val": write_shards(items(held_out_ids, val_captions), out_dir / "val", samples_per_shard=samples_per_shard),
        "classification": write_shards(
            Source(items(held_out_ids, None), classnames=CLASSNAMES),
            out_dir / "classification",
            samples_per_shard=samples_per_shard,
        ),
    }
    (out_dir / "classification" / "templates.json").write_text(
        json.dumps(ZERO_SHOT_TEMPLATES, indent=2) + "\n", encoding="utf-8"
    )
    tokenizer = train_tokenizer(
        [train_captions[i] for i in train_ids],
        out_dir / "tokenizer",
        model_type=tokenizer_type,
        vocab_size=vocab_size,
        overwrite=True,
    )

    split_ids = {"train": train_ids, "val": held_out_ids, "classification": held_out_ids}
    info = {
        "name": DATASET_NAME,
        "source": "sklearn.datasets.load_digits: 1,797 8x8 scans of handwritten digits (UCI), shipped with scikit-learn",
        "options": options,
        "splits": {
            split: {
                "samples": stats.successes,
                "shards": len(stats.shards),
                "urls": _shard_pattern(split, len(stats.shards)),
                "per_class": [Counter(labels[i] for i in split_ids[split])[c] for c in range(len(CLASSNAMES))],
            }
            for split, stats in written.items()
        },
        "classnames": CLASSNAMES,
        "templates": ZERO_SHOT_TEMPLATES,
        "tokenizer": {"path": "tokenizer", "model_type": tokenizer_type, "vocab_size": tokenizer.vocab_size},
    }
    files = [f"{split}/{shard.name}" for split, stats in written.items() for shard in stats.shards]
    files += ["classification/classnames.txt", "classification/templates.json", "tokenizer/tokenizer.json", "README.md"]
    info["files"] = files
    (out_dir / "README.md").write_text(_readme(info), encoding="utf-8")
    # info.json last: its presence marks a complete build.
    (out_dir / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out_dir / BUILDING).unlink(missing_ok=True)
    return info


def _clear_previous_build(out_dir: Path) -> None:
    """Remove what an earlier build wrote (a complete one, or one stopped half-way); refuse when those
    names hold something this tool did not write (a folder without its info.json or build marker)."""
    names = [name for name in (*SPLITS, "tokenizer", "info.json", "README.md")
             if (out_dir / name).exists() or (out_dir / name).is_symlink()]
    if not names:
        return
    if not _is_demo_folder(out_dir):
        raise DataToolsError(f"{out_dir} already holds {', '.join(names)}, which mmcl-demo-data did not write; "
                             "choose a new or empty --out.")
    for name in names:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()  # a file, or a link (never what it points to)


def _is_demo_folder(out_dir: Path) -> bool:
    """True when this tool wrote `out_dir`: its build marker, or an info.json of the demo dataset."""
    if (out_dir / BUILDING).is_file():
        return True
    try:
        info = json.loads((out_dir / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("name") == DATASET_NAME


def _readme(info: dict) -> str:
    splits = info["splits"]
    rows = "\n".join(f"| {name} | {s['samples']} | {s['shards']} | `{s['urls']}` |" for name, s in splits.items())
    return f"""# mmcl digits demo dataset

Built by `mmcl-demo-data` from {info['source']}.
Images are upscaled to {info['options']['image_size']} px (bicubic, dark ink on white, RGB PNG);
the split is stratified and seeded (seed {info['options']['seed']}, {info['options']['val_fraction']:.0%} held out).

| split | samples | shards | shard pattern |
|---|---|---|---|
{rows}

- `train/`: one caption per image from {len(CAPTION_TEMPLATES)} phrasings that name the digit as a word
  ("seven") or a numeral ("7"), plus the label in `.cls`.
- `val/`: the held-out images with captions and labels, for image-text retrieval.
- `classification/`: the same held-out images with labels; `classnames.txt` ({', '.join(info['classnames'])})
  and `templates.json` (zero-shot prompts, `{{}}` is the class name) sit beside the shards.
- `tokenizer/`: a SentencePiece {info['tokenizer']['model_type']} tokenizer with {info['tokenizer']['vocab_size']} pieces trained
  on the train captions; load it with `AutoTokenizer.from_pretrained("<this folder>/tokenizer")`.

`info.json` holds the same facts for programs. Rebuild with `mmcl-demo-data --out <folder> --force`.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcl-demo-data", description="Build the offline digits demo dataset (shards + tokenizer)."
    )
    parser.add_argument("--out", metavar="DIR", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument("--image-size", metavar="N", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument(
        "--seed", metavar="N", type=int, default=0, help="seed for the split and the captions (default 0)"
    )
    parser.add_argument(
        "--val-fraction", metavar="F", type=float, default=0.2, help="share of images held out (default 0.2)"
    )
    parser.add_argument(
        "--samples-per-shard", metavar="N", type=int, default=500, help="samples per shard (default 500)"
    )
    parser.add_argument(
        "--vocab-size",
        metavar="N",
        type=int,
        default=256,
        help="tokenizer vocabulary size, an upper bound (default 256)",
    )
    parser.add_argument(
        "--tokenizer-type", choices=("unigram", "bpe"), default="bpe", help="SentencePiece algorithm (default bpe)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete dataset is there")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`mmcl-demo-data`)."""
    args = build_parser().parse_args(argv)
    settings = dict(
        image_size=args.image_size,
        seed=args.seed,
        val_fraction=args.val_fraction,
        samples_per_shard=args.samples_per_shard,
        vocab_size=args.vocab_size,
        tokenizer_type=args.tokenizer_type,
    )
    try:
        if not args.force and is_complete(args.out, demo_options(**settings)):
            print(f"demo dataset at {args.out} is complete; nothing to do (pass --force to rebuild)")
            return 0
        info = build_demo(args.out, force=args.force, **settings)
    except DataToolsError as error:
        raise SystemExit(f"mmcl-demo-data: error: {error}") from None
    counts = ", ".join(f"{name} {split['samples']}" for name, split in info["splits"].items())
    print(
        f"demo dataset written to {args.out}: {counts} samples; tokenizer with {info['tokenizer']['vocab_size']} pieces"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
