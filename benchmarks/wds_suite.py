"""A small benchmark suite in CLIP_benchmark's WebDataset layout, from the demo digits and the shapes.

    python benchmarks/wds_suite.py --demo data/demo --out data/wds_suite
    mmcl benchmark --model runs/demo --root data/wds_suite --tasks data/wds_suite/tasks.yaml --out results/demo

Writes, as `clip_benchmark.webdataset_builder` would (s%07d keys, <split>/<n>.tar + nshards.txt):
    wds_digits/             the demo's held-out digits (classification/), test/ 360; train/ = the demo's train
                            shards (linear probe); its classnames and templates ({} -> {c})
    wds_digits_captions/    the demo's val/ images with their caption (retrieval, dataset_type.txt)
    wds_shapes/             benchmarks/shapes_dataset.py's 12 classes, test/ 240, train/ 600 (out of domain
                            for a digits model)
    wds_shapes_multilabel/  the same shapes labelled by colour and shape (7 labels, two per image, .npy)
and tasks.yaml (zero-shot on all four, a 10-shot and a full linear probe on the digits).
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes_dataset import CLASSNAMES as SHAPE_CLASSES  # noqa: E402
from shapes_dataset import COLOURS, SHAPES, TEMPLATES, shape_png  # noqa: E402

TASKS = """\
- {dataset: wds/digits, task: zeroshot_classification, name: Digits}
- {dataset: wds/digits_captions, task: zeroshot_retrieval, name: Digit captions}
- {dataset: wds/shapes, task: zeroshot_classification, name: Shapes, main_metric: mean_per_class_recall}
- {dataset: wds/shapes_multilabel, task: zeroshot_classification, name: Shapes (multi-label), main_metric: mean_average_precision}
- {dataset: wds/digits, task: linear_probe, name: Digits probe 10-shot, shots: 10}
- {dataset: wds/digits, task: linear_probe, name: Digits probe}
- {dataset: wds/cifar10, task: zeroshot_classification, name: CIFAR-10 (not built here)}
"""


def write_split(folder: Path, samples: list[dict[str, bytes]], per_shard: int = 1000) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for count, start in enumerate(range(0, len(samples), per_shard), 1):
        with tarfile.open(folder / f"{count - 1}.tar", "w") as tar:
            for index, sample in enumerate(samples[start:start + per_shard], start):
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"s{index:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "nshards.txt").write_text(f"{count}\n")


def read_samples(shards: list[Path]) -> list[dict[str, bytes]]:
    """The samples of mmcl shards in order: {extension: bytes} (members grouped by key)."""
    samples: list[dict[str, bytes]] = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            key = None
            for member in tar.getmembers():
                stem, ext = member.name.split(".", 1)
                if stem != key:
                    samples.append({})
                    key = stem
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def build(demo: Path, out: Path) -> Path:
    import json

    digits = out / "wds_digits"
    held_out = read_samples([demo / "classification" / "00000.tar"])
    write_split(digits / "test", [{"png": s["png"], "cls": s["cls"]} for s in held_out])
    train = read_samples(sorted((demo / "train").glob("*.tar")))
    write_split(digits / "train", [{"png": s["png"], "cls": s["cls"]} for s in train])
    (digits / "classnames.txt").write_text((demo / "classification" / "classnames.txt").read_text())
    templates = json.loads((demo / "classification" / "templates.json").read_text())
    (digits / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates) + "\n")

    captions = out / "wds_digits_captions"
    write_split(captions / "test", [{"png": s["png"], "txt": s["txt"]} for s in read_samples([demo / "val" / "00000.tar"])])
    (captions / "dataset_type.txt").write_text("retrieval\n")

    rng = random.Random(0)
    shapes, multilabel = out / "wds_shapes", out / "wds_shapes_multilabel"
    test = [(label, shape_png(label, 32, rng)) for label in range(12) for _ in range(20)]
    write_split(shapes / "test", [{"png": png, "cls": str(label).encode()} for label, png in test])
    write_split(shapes / "train", [{"png": shape_png(label, 32, rng), "cls": str(label).encode()}
                                   for label in range(12) for _ in range(50)])
    (shapes / "classnames.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")
    (shapes / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in TEMPLATES) + "\n")
    labels = list(COLOURS) + list(SHAPES)
    rows = []
    for label, png in test:
        vector = np.zeros(len(labels), dtype=np.int64)
        vector[label // len(SHAPES)] = vector[len(COLOURS) + label % len(SHAPES)] = 1
        buffer = io.BytesIO()
        np.save(buffer, vector)
        rows.append({"png": png, "npy": buffer.getvalue()})
    write_split(multilabel / "test", rows)
    (multilabel / "classnames.txt").write_text("\n".join(labels) + "\n")
    (multilabel / "zeroshot_classification_templates.txt").write_text("a {c} shape\na drawing of a {c} shape\n")
    (multilabel / "dataset_type.txt").write_text("multilabel\n")
    (out / "tasks.yaml").write_text(TASKS)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="the demo dataset folder (mmcl-demo-data --out ...)")
    parser.add_argument("--out", required=True, help="folder to write the wds_* datasets and tasks.yaml into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"wds_suite: --out {out} is not empty; pass a new folder", file=sys.stderr)
        return 2
    print(f"wrote {build(Path(args.demo), out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
