"""A synthetic image-text set where aspect ratio matters: shapes on wide (4:1) and tall (1:4) canvases.

    python benchmarks/aspect_dataset.py --out /tmp/aspect [--short 64] [--ratio 4] [--seed 0]

6 classes: 2 colours x 3 shapes ("red circle", ..., "blue triangle"), captions in the phrasings of
`shapes_dataset.py` naming colour and shape (no synonyms, so a tiny model learns them in a few hundred
steps; colour alone gives 50%, so the shape is what separates the arms). Each image is one shape on a noisy grey canvas, half of them wide
(ratio x short px), half tall (short x ratio px). Along the long side the shape sits near one end
(`--near-ends`, half of the images: entirely in the outer (1 - 1/ratio)/2 of the side, so it lies
outside a centre square crop) or anywhere (the rest); across the short side anywhere.

Every image exists three ways, in three shard trees with the same keys and captions:

- `native/`: the canvas as drawn (what NaFlex sees, at its own aspect ratio);
- `squash/`: the canvas resized to short x short ignoring its aspect ratio (bilinear, antialiased:
  NaFlex's own resize), so a wide shape is squeezed `ratio` times along the long side;
- `crop/`:   the centre short x short square of the canvas (no resampling): what a square
  centre crop keeps.

Each tree holds `train/` (captioned) and `classification/` (held out, `.cls` labels,
classnames.txt, templates.json). A SigLIP 2 (Gemma-style, left-padded) tokenizer learnt on the
training captions is in `tokenizer/`. `info.json` (written last) has the patterns (relative to `--out`), the class
names, and how much of each held-out shape a centre crop keeps. PNG bytes throughout, written by
the repository's `data_tools.write_shards`.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes_dataset import CAPTIONS, TEMPLATES, paint  # noqa: E402

COLOURS = {"red": (200, 40, 40), "blue": (40, 70, 210)}
SHAPES = ("circle", "square", "triangle")
CLASSNAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
VIEWS = ("native", "squash", "crop")


def caption(label: int, rng: random.Random) -> str:
    colour, shape = CLASSNAMES[label].split()
    return rng.choice(CAPTIONS).format(colour=colour, noun=shape)


def draw(label: int, short: int, ratio: int, wide: bool, near_ends: float, rng: random.Random):
    """One canvas of class `label`: (uint8 array [H, W, 3], fraction of the shape's extent along the long side
    that lies inside the centre short x short square)."""
    from PIL import Image

    long = short * ratio
    colour = list(COLOURS.values())[label // len(SHAPES)]
    shape = SHAPES[label % len(SHAPES)]
    grey = rng.randint(90, 170)
    extent = rng.uniform(0.5, 0.9) * short
    across = rng.uniform(0, short - extent)
    margin = (long - short) / 2  # the part of the long side outside the centre square, at each end
    if rng.random() < near_ends and margin >= extent:
        along = rng.uniform(0, margin - extent)
        if rng.random() < 0.5:
            along = long - extent - along
    else:
        along = rng.uniform(0, long - extent)
    inside = max(0.0, min(along + extent, margin + short) - max(along, margin)) / extent
    width, height = (long, short) if wide else (short, long)
    x0, y0 = (along, across) if wide else (across, along)
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    return paint(image, shape, colour, x0, y0, extent, rng), inside


def views(pixels, short: int) -> dict[str, bytes]:
    """{view: PNG bytes}: the canvas, squashed to short x short, centre-cropped to short x short."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
    arrays = {
        "native": image,
        "squash": F.resize(image, [short, short], interpolation=F.InterpolationMode.BILINEAR, antialias=True),
        "crop": F.center_crop(image, [short, short]),
    }
    out = {}
    for name, array in arrays.items():
        buffer = io.BytesIO()
        Image.fromarray(array.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        out[name] = buffer.getvalue()
    return out


def build_aspect(out_dir: str | Path, short: int = 64, ratio: int = 4, seed: int = 0, train_per_class: int = 300,
                 held_out_per_class: int = 80, near_ends: float = 0.5) -> dict:
    """Write the three shard trees and the tokenizer to `out_dir`; returns info.json's content."""
    from data_tools.samples import SourceItem
    from data_tools.sources import Source
    from data_tools.train_tokenizer import train_siglip2_tokenizer
    from data_tools.write_shards import write_shards

    out = Path(out_dir)
    options = {"short": short, "ratio": ratio, "seed": seed, "train_per_class": train_per_class,
               "held_out_per_class": held_out_per_class, "near_ends": near_ends}
    info_file = out / "info.json"
    if info_file.is_file():  # built before with the same options: same bytes
        info = json.loads(info_file.read_text())
        if info.get("options") == options:
            return located(info, out)
    rng = random.Random(seed)

    def rows(per_class: int) -> list[tuple[int, dict[str, bytes], str, float]]:
        made = []
        for label in range(len(CLASSNAMES)):
            for index in range(per_class):
                pixels, inside = draw(label, short, ratio, index % 2 == 0, near_ends, rng)
                made.append((label, views(pixels, short), caption(label, rng), inside))
        return made

    train, held_out = rows(train_per_class), rows(held_out_per_class)
    rng.shuffle(train)
    info: dict = {"options": options, "classnames": CLASSNAMES, "templates": TEMPLATES}
    for view in VIEWS:
        train_items = [SourceItem(source=f"aspect[{i}]", image=images[view], captions=(text,), label=label)
                       for i, (label, images, text, _) in enumerate(train)]
        held_items = [SourceItem(source=f"aspect[{i}]", image=images[view], captions=(CLASSNAMES[label],), label=label)
                      for i, (label, images, _, _) in enumerate(held_out)]
        write_shards(train_items, out / view / "train", samples_per_shard=600, overwrite=True)
        write_shards(Source(held_items, classnames=CLASSNAMES), out / view / "classification",
                     samples_per_shard=1000, overwrite=True)
        (out / view / "classification" / "templates.json").write_text(json.dumps(TEMPLATES, indent=2) + "\n")
        shards = len(list((out / view / "train").glob("*.tar")))
        info[view] = {"train": f"{view}/train/{{00000..{shards - 1:05d}}}.tar",
                      "classification": f"{view}/classification/00000.tar"}
    train_siglip2_tokenizer([text for _, _, text, _ in train], out / "tokenizer", vocab_size=256, max_length=16,
                            overwrite=True)
    info["tokenizer"] = "tokenizer"
    inside = [row[3] for row in held_out]
    info["held_out"] = {
        "images": len(held_out),
        "centre_crop_keeps_all": sum(f >= 0.999 for f in inside) / len(inside),
        "centre_crop_keeps_part": sum(0.0 < f < 0.999 for f in inside) / len(inside),
        "centre_crop_keeps_none": sum(f == 0.0 for f in inside) / len(inside),
    }
    info_file.write_text(json.dumps(info, indent=2) + "\n")  # paths relative to out_dir: the folder can move
    return located(info, out)


def located(info: dict, out: Path) -> dict:
    """info.json's content with its paths made absolute under `out`."""
    info = json.loads(json.dumps(info))
    for view in VIEWS:
        info[view] = {split: str(out / path) for split, path in info[view].items()}
    info["tokenizer"] = str(out / info["tokenizer"])
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--short", type=int, default=64, help="short side of a canvas in pixels")
    parser.add_argument("--ratio", type=int, default=4, help="long side / short side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--held-out-per-class", type=int, default=80)
    parser.add_argument("--near-ends", type=float, default=0.5, help="share of shapes placed outside the centre square")
    args = parser.parse_args(argv)
    info = build_aspect(args.out, args.short, args.ratio, args.seed, args.train_per_class, args.held_out_per_class,
                        args.near_ends)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
