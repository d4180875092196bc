"""A web-like image-text corpus with known corruption, for the data-curation benchmark (issue 26).

    python benchmarks/curation_corpus.py --out /tmp/curation_bench/corpus [--originals 3900] [--seed 0]

Built offline from the coloured shapes of `benchmarks/shapes_dataset.py` (12 classes: 4 colours x
3 shapes, nouns with synonyms: circle/ring/disc, square/box/block, triangle/wedge/arrowhead),
stored as real JPEGs in WebDataset shards (img2dataset's layout, `sizes.json` beside them):

    web/             the corpus to curate: a long tail (3 head classes, the red ones, each HEAD_FACTOR times as
                     frequent as each of the 9 tail classes), 20% near-duplicates (a copy of an
                     earlier image re-encoded at another JPEG quality or slightly cropped, with a
                     new caption), and 30% of all captions replaced by the caption of an image of
                     another class (mismatched pairs)
    clean/           a small clean, balanced part (correct captions, no duplicates) for training a
                     scoring model on clean data
    classification/  balanced held-out images with .cls, classnames.txt and templates.json
                     (mmcl's zero-shot evaluation reads them as it reads the demo's)
    tokenizer/       a BPE tokenizer trained on every caption and prompt
    metadata.txt     the MetaCLIP-style metadata list: every "<colour> <noun>" with each synonym
    truth.parquet    one row per web sample: key, shard, index, label, classname, caption,
                     caption_label, mismatched, duplicate, duplicate_of, duplicate_kind, group, tail
    info.json        options, shard patterns, head and tail classes, counts (written last)

Ground truth: `mismatched` is true when the caption describes another class than the image;
`duplicate` is true for the copies (the first occurrence of each image, `duplicate_of` null, is
the original); `group` is the key of the original for both, so a dedup rule is right to remove
all but one sample of each group.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from shapes_dataset import CLASSNAMES, COLOURS, SHAPES, TEMPLATES, shape_png

# The head: one colour in every shape, so telling the head classes apart needs the shape (a head
# that differed in colour alone let the model learn colour and never shape).
HEAD_CLASSES = ["red circle", "red square", "red triangle"]
# Web-like phrasings; colour and noun always stand together so a metadata entry "red ring" matches.
WEB_CAPTIONS = [
    "a {colour} {noun}",
    "a drawing of a {colour} {noun}",
    "a picture of a {colour} {noun}",
    "a small {colour} {noun} on a grey background",
    "one {colour} {noun}",
    "{colour} {noun} clip art",
    "my {colour} {noun} drawing",
    "{colour} {noun} icon, free download",
]
FORMAT_VERSION = 2


def web_caption(label: int, rng: random.Random) -> str:
    """A caption of class `label`: a phrasing and a synonym of its shape drawn from `rng`."""
    colour = list(COLOURS)[label // len(SHAPES)]
    noun = rng.choice(list(SHAPES.values())[label % len(SHAPES)])
    return rng.choice(WEB_CAPTIONS).format(colour=colour, noun=noun)


def metadata_entries() -> list[str]:
    """MetaCLIP's metadata list for these classes: "<colour> <synonym>" for every synonym."""
    return [f"{colour} {noun}" for colour in COLOURS for nouns in SHAPES.values() for noun in nouns]


def as_jpeg(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def shape_image(label: int, size: int, rng: random.Random):
    """One shapes image (PIL RGB) of class `label`."""
    from PIL import Image

    return Image.open(io.BytesIO(shape_png(label, size, rng))).convert("RGB")


def near_duplicate(jpeg: bytes, rng: random.Random) -> tuple[bytes, str]:
    """The same picture re-encoded at another JPEG quality, or slightly cropped; (bytes, kind)."""
    from PIL import Image

    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    if rng.random() < 0.5:
        return as_jpeg(image, rng.randint(40, 75)), "requality"
    width, height = image.size
    left, top = rng.randint(0, 3), rng.randint(0, 3)
    right, bottom = width - rng.randint(0, 3), height - rng.randint(0, 3)
    if (left, top, right, bottom) == (0, 0, width, height):
        left = 2
    return as_jpeg(image.crop((left, top, right, bottom)), 90), "crop"


def class_counts(originals: int, head_factor: int) -> list[int]:
    """Originals per class: each head class `head_factor` times a tail class; sums to `originals`."""
    weights = [head_factor if name in HEAD_CLASSES else 1 for name in CLASSNAMES]
    counts = [int(originals * w / sum(weights)) for w in weights]
    for i in range(originals - sum(counts)):  # the rounding remainder, one each from the head down
        counts[CLASSNAMES.index(HEAD_CLASSES[i % len(HEAD_CLASSES)])] += 1
    return counts


def write_set(rows: list[dict], out: Path, samples_per_shard: int, classnames: list[str] | None = None) -> list[dict]:
    """Write rows ({"image": jpeg, "caption", "label"}) as shards in `out`; adds "key", "shard", "index".

    Labels (.cls) are written only with `classnames` (the evaluation set): web data has none.
    """
    from data_tools.samples import ImageOptions, SourceItem, prepare_sample
    from data_tools.tar_writer import ShardSetWriter

    options = ImageOptions()
    with ShardSetWriter(out, samples_per_shard=samples_per_shard) as writer:
        for i, row in enumerate(rows):
            prepared = prepare_sample(SourceItem(source=f"{out.name}[{i}]", image=row["image"],
                                                 captions=(row["caption"],),
                                                 label=row["label"] if classnames else None), options)
            if not hasattr(prepared, "image") or prepared.ext != "jpg":
                raise RuntimeError(f"sample {i} of {out} was not stored as a JPEG: {prepared}")
            row["key"] = writer.add(prepared)
            row["shard"] = str(out / writer.stats.shards[-1].name)
            row["index"] = writer.stats.shards[-1].successes - 1
    if classnames is not None:
        (out / "classnames.txt").write_text("\n".join(classnames) + "\n")
    return rows


def build_corpus(out_dir: str | Path, originals: int = 3900, head_factor: int = 10, duplicates: float = 0.2,
                 mismatched: float = 0.3, clean_per_class: int = 50, eval_per_class: int = 60,
                 image_size: int = 40, samples_per_shard: int = 1000, seed: int = 0) -> dict:
    """Write the corpus to `out_dir` (or find it complete with the same options); returns info.json's content."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.train_tokenizer import train_tokenizer

    out = Path(out_dir)
    options = {"originals": originals, "head_factor": head_factor, "duplicates": duplicates, "mismatched": mismatched,
               "clean_per_class": clean_per_class, "eval_per_class": eval_per_class, "image_size": image_size,
               "samples_per_shard": samples_per_shard, "seed": seed, "head_classes": HEAD_CLASSES,
               "format_version": FORMAT_VERSION}
    info_file = out / "info.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("options") == options:
            return info
        raise SystemExit(f"{out} holds a corpus built with other options; choose another --out or remove it.")
    rng = random.Random(seed)

    # Originals with their own captions, in a long-tailed class mix.
    web = []
    for label, count in enumerate(class_counts(originals, head_factor)):
        for _ in range(count):
            web.append({"image": as_jpeg(shape_image(label, image_size, rng), 90), "label": label,
                        "caption": web_caption(label, rng), "duplicate": False, "duplicate_kind": None, "source": len(web)})
    rng.shuffle(web)
    for i, row in enumerate(web):
        row["source"] = i
    # Near-duplicates: `duplicates` of the final corpus are copies of an original, with a new caption.
    n_copies = round(originals * duplicates / (1 - duplicates))
    copies = []
    for _ in range(n_copies):
        source = rng.randrange(originals)
        image, kind = near_duplicate(web[source]["image"], rng)
        label = web[source]["label"]
        copies.append({"image": image, "label": label, "caption": web_caption(label, rng), "duplicate": True,
                       "duplicate_kind": kind, "source": source})
    # Each copy lands anywhere after its original (the original is the first occurrence).
    order = [float(i) for i in range(originals)] + [rng.uniform(c["source"] + 0.5, originals) for c in copies]
    web = [row for _, row in sorted(zip(order, web + copies), key=lambda pair: pair[0])]
    # Mismatched pairs: a share of all captions replaced by the caption of an image of another class.
    own = [row["caption"] for row in web]
    for row in web:
        row["caption_label"] = row["label"]
        row["mismatched"] = False
    for i in rng.sample(range(len(web)), round(mismatched * len(web))):
        while True:
            j = rng.randrange(len(web))
            if web[j]["label"] != web[i]["label"]:
                break
        web[i]["caption"], web[i]["caption_label"], web[i]["mismatched"] = own[j], web[j]["label"], True

    clean = [{"image": as_jpeg(shape_image(label, image_size, rng), 90), "label": label,
              "caption": web_caption(label, rng)} for label in range(len(CLASSNAMES)) for _ in range(clean_per_class)]
    rng.shuffle(clean)
    held_out = [{"image": as_jpeg(shape_image(label, image_size, rng), 90), "label": label,
                 "caption": CLASSNAMES[label]} for label in range(len(CLASSNAMES)) for _ in range(eval_per_class)]

    out.mkdir(parents=True, exist_ok=True)
    write_set(web, out / "web", samples_per_shard)
    write_set(clean, out / "clean", samples_per_shard)
    write_set(held_out, out / "classification", samples_per_shard, classnames=CLASSNAMES)
    (out / "classification" / "templates.json").write_text(json.dumps(TEMPLATES, indent=2) + "\n")
    (out / "metadata.txt").write_text("\n".join(metadata_entries()) + "\n")
    train_tokenizer([r["caption"] for r in (*web, *clean)] + [t.format(c) for t in TEMPLATES for c in CLASSNAMES],
                    out / "tokenizer", model_type="bpe", vocab_size=256, overwrite=True)

    key_of = {row["source"]: row["key"] for row in web if not row["duplicate"]}
    tail = [c for c in CLASSNAMES if c not in HEAD_CLASSES]
    truth = pa.table({
        "key": [r["key"] for r in web],
        "shard": [r["shard"] for r in web],
        "index": pa.array([r["index"] for r in web], pa.int32()),
        "label": pa.array([r["label"] for r in web], pa.int32()),
        "classname": [CLASSNAMES[r["label"]] for r in web],
        "caption": [r["caption"] for r in web],
        "caption_label": pa.array([r["caption_label"] for r in web], pa.int32()),
        "mismatched": [r["mismatched"] for r in web],
        "duplicate": [r["duplicate"] for r in web],
        "duplicate_of": [key_of[r["source"]] if r["duplicate"] else None for r in web],
        "duplicate_kind": pa.array([r["duplicate_kind"] for r in web], pa.string()),
        "group": [key_of[r["source"]] for r in web],
        "tail": [CLASSNAMES[r["label"]] in tail for r in web],
    })
    pq.write_table(truth, out / "truth.parquet")

    def pattern(split: str) -> str:
        shards = sorted((out / split).glob("*.tar"))
        return str(out / split / (f"{{00000..{len(shards) - 1:05d}}}.tar" if len(shards) > 1 else shards[0].name))

    per_class = Counter(CLASSNAMES[r["label"]] for r in web)
    info = {
        "options": options,
        "web": pattern("web"), "clean": pattern("clean"), "classification": pattern("classification"),
        "tokenizer": str(out / "tokenizer"), "metadata": str(out / "metadata.txt"), "truth": str(out / "truth.parquet"),
        "classnames": CLASSNAMES, "templates": TEMPLATES, "head_classes": HEAD_CLASSES, "tail_classes": tail,
        "counts": {"web": len(web), "web_originals": originals, "web_duplicates": n_copies,
                   "web_mismatched": sum(r["mismatched"] for r in web),
                   "web_mismatched_or_duplicate": sum(r["mismatched"] or r["duplicate"] for r in web),
                   "web_per_class": {c: per_class[c] for c in CLASSNAMES},
                   "clean": len(clean), "classification": len(held_out)},
    }
    info_file.write_text(json.dumps(info, indent=2) + "\n")  # last: marks a complete build
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--originals", type=int, default=3900, help="distinct web images (default 3900)")
    parser.add_argument("--head-factor", type=int, default=10, help="head class frequency / tail class frequency")
    parser.add_argument("--clean-per-class", type=int, default=50)
    parser.add_argument("--eval-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = build_corpus(args.out, args.originals, args.head_factor, clean_per_class=args.clean_per_class,
                        eval_per_class=args.eval_per_class, seed=args.seed)
    print(json.dumps(info["counts"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
