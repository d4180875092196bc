"""A second small image-text dataset, built offline: coloured shapes on noisy backgrounds.

    python benchmarks/shapes_dataset.py --out /tmp/shapes [--image-size 32] [--seed 0]

12 classes (4 colours x 3 shapes, e.g. "red circle"); each image is one shape of random size,
position and shade on a random grey background with pixel noise. Captions vary the phrasing
and sometimes name the shape only by a synonym ("ring", "box", "wedge"), so the text tower
has to learn more than a lookup. The layout is the demo's (`data_tools/demo_dataset.py`):
train/, val/, classification/ (+ classnames.txt, templates.json) and tokenizer/, so every
demo command runs on it by pointing the shard keys here.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (220, 200, 40)}
SHAPES = {"circle": ("circle", "ring", "disc"), "square": ("square", "box", "block"), "triangle": ("triangle", "wedge", "arrowhead")}
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
CAPTIONS = [
    "a {colour} {noun}",
    "a drawing of a {colour} {noun}",
    "a {noun} painted {colour}",
    "a small {colour} {noun} on a grey background",
    "a picture of a {colour} {noun}",
    "one {colour} {noun}",
]
TEMPLATES = ["a {}", "a drawing of a {}", "a picture of a {}", "a small {} on a grey background"]


def paint(image, shape: str, colour: tuple[int, int, int], x0: float, y0: float, extent: float, rng: random.Random):
    """Draw `shape` (circle / square / triangle) of side `extent` at (x0, y0) on the PIL `image` in a shade of
    `colour` drawn from `rng`, then add Gaussian noise (sd 12) seeded from `rng`: uint8 [H, W, 3]."""
    import numpy as np
    from PIL import ImageDraw

    pen = ImageDraw.Draw(image)
    shade = tuple(int(max(0, min(255, c * rng.uniform(0.75, 1.15)))) for c in colour)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        pen.ellipse(box, fill=shade)
    elif shape == "square":
        pen.rectangle(box, fill=shade)
    else:
        pen.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=shade)
    pixels = np.asarray(image, dtype=np.float32)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, pixels.shape)
    return (pixels + noise).clip(0, 255).astype("uint8")


def shape_png(label: int, size: int, rng: random.Random) -> bytes:
    """One image of class `label` as PNG bytes."""
    from PIL import Image

    colour = list(COLOURS.values())[label // len(SHAPES)]
    shape = list(SHAPES)[label % len(SHAPES)]
    grey = rng.randint(90, 170)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    extent = rng.uniform(0.35, 0.7) * size
    x0, y0 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
    buffer = io.BytesIO()
    Image.fromarray(paint(image, shape, colour, x0, y0, extent, rng)).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(label: int, rng: random.Random) -> str:
    colour = list(COLOURS)[label // len(SHAPES)]
    nouns = list(SHAPES.values())[label % len(SHAPES)]
    return rng.choice(CAPTIONS).format(colour=colour, noun=rng.choice(nouns))


def build_shapes(out_dir: str | Path, image_size: int = 32, seed: int = 0, train_per_class: int = 150,
                 held_out_per_class: int = 40) -> dict:
    """Write the dataset to `out_dir`; returns {split: pattern} plus classnames and templates."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from data_tools.samples import SourceItem
    from data_tools.sources import Source
    from data_tools.train_tokenizer import train_tokenizer
    from data_tools.write_shards import write_shards

    out = Path(out_dir)
    info_file = out / "info.json"
    if info_file.is_file():  # built before (written last): same options give the same bytes
        return json.loads(info_file.read_text())
    rng = random.Random(seed)
    train = [(label, shape_png(label, image_size, rng), caption(label, rng))
             for label in range(len(CLASSNAMES)) for _ in range(train_per_class)]
    held_out = [(label, shape_png(label, image_size, rng), caption(label, rng))
                for label in range(len(CLASSNAMES)) for _ in range(held_out_per_class)]
    rng.shuffle(train)

    def items(rows, with_captions: bool):
        return [SourceItem(source=f"shapes[{i}]", image=png, captions=(text if with_captions else CLASSNAMES[label],),
                           label=label) for i, (label, png, text) in enumerate(rows)]

    write_shards(items(train, True), out / "train", samples_per_shard=500)
    write_shards(items(held_out, True), out / "val", samples_per_shard=1000)
    write_shards(Source(items(held_out, False), classnames=CLASSNAMES), out / "classification", samples_per_shard=1000)
    (out / "classification" / "templates.json").write_text(json.dumps(TEMPLATES, indent=2) + "\n")
    train_tokenizer([text for _, _, text in train], out / "tokenizer", model_type="bpe", vocab_size=256, overwrite=True)
    shards = len(list((out / "train").glob("*.tar")))
    info = {"train": str(out / "train" / f"{{00000..{shards - 1:05d}}}.tar"),
            "val": str(out / "val" / "00000.tar"), "classification": str(out / "classification" / "00000.tar"),
            "tokenizer": str(out / "tokenizer"), "classnames": CLASSNAMES, "templates": TEMPLATES}
    info_file.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(build_shapes(args.out, args.image_size, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
