"""Tiny datasets in CLIP_benchmark's WebDataset layout, a tiny mmcl model and its OpenCLIP-format export,
shared by tests/evaluation/test_benchmark*.py and tests/e2e/test_benchmark_launch.py.

    wds_digits/             classification: the real handwritten digits (sklearn's), test/ 2 shards, train/ 2 shards
    wds_shapes_multilabel/  multi-label: coloured shapes (benchmarks/shapes_dataset.py), .npy 0/1 vectors over
                            4 colours + 3 shapes (two labels per image), dataset_type.txt = multilabel
    wds_digits_captions/    retrieval: digits with two distinct captions each (one per line of .txt),
                            dataset_type.txt = retrieval
Written as `clip_benchmark.webdataset_builder` writes them: s%07d keys, <split>/<n>.tar + nshards.txt.
"""
from __future__ import annotations

import io
import random
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "export"))
sys.path.insert(0, str(REPO / "benchmarks"))
from export_helpers import build, run_config, write_run  # noqa: E402

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MULTILABEL = ["red", "green", "blue", "yellow", "circle", "square", "triangle"]
# Every word of the class names, templates and captions is in the vocabulary: no two classes share a prompt
# (an exact tie would be broken differently by CLIP_benchmark's topk and mmcl's stable sort).
WORDS = ["a", "photo", "of", "the", "digit", "handwritten", "shape", "drawing", "with", "by", "hand", "number",
         "written", "small", "big", "dark", "light", "thin", "bold", *DIGITS, *MULTILABEL]
TASK_LIST = """\
- dataset: wds/digits
  task: zeroshot_classification
  name: Digits
- dataset: wds/shapes_multilabel
  task: zeroshot_classification
  main_metric: mean_average_precision
- dataset: wds/digits_captions
  task: zeroshot_retrieval
- dataset: wds/digits
  task: linear_probe
  shots: 3
- dataset: wds/not_downloaded
  task: zeroshot_classification
"""


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(folder: Path, samples: list[dict[str, bytes]], per_shard: int, offset: int = 0) -> None:
    """<folder>/<n>.tar (s%07d keys, in order) + nshards.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, len(samples), per_shard), 1):
        with tarfile.open(folder / f"{shards - 1}.tar", "w") as tar:
            for index, sample in enumerate(samples[start:start + per_shard], offset + start):
                for ext, data in sample.items():
                    info = tarfile.TarInfo(f"s{index:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (folder / "nshards.txt").write_text(f"{shards}\n")


def digit_images(start: int, count: int, size: int = 24):
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    for i in range(start, start + count):
        image = Image.fromarray((data.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        yield image.convert("RGB"), int(data.target[i])


def write_suite(root: Path, test: int = 40, train: int = 50) -> Path:
    """The three datasets under `root` (see the module docstring). Returns root."""
    from shapes_dataset import SHAPES, shape_png

    digits = root / "wds_digits"
    write_split(digits / "test", [{"png": png(im), "cls": str(y).encode()} for im, y in digit_images(0, test)], test // 2)
    write_split(digits / "train", [{"png": png(im), "cls": str(y).encode()} for im, y in digit_images(500, train)], train // 2)
    (digits / "classnames.txt").write_text("\n".join(DIGITS) + "\n")
    (digits / "zeroshot_classification_templates.txt").write_text("a photo of the digit {c}.\nhandwritten {c}\n")

    shapes = root / "wds_shapes_multilabel"
    rng = random.Random(0)
    samples = []
    for i in range(24):
        label = i % 12
        vector = np.zeros(len(MULTILABEL), dtype=np.int64)
        vector[label // len(SHAPES)] = 1
        vector[4 + label % len(SHAPES)] = 1
        buffer = io.BytesIO()
        np.save(buffer, vector)
        samples.append({"png": shape_png(label, 24, rng), "npy": buffer.getvalue()})
    write_split(shapes / "test", samples, 12)
    (shapes / "classnames.txt").write_text("\n".join(MULTILABEL) + "\n")
    (shapes / "zeroshot_classification_templates.txt").write_text("a {c} shape\na drawing with {c}\n")
    (shapes / "dataset_type.txt").write_text("multilabel\n")

    captions = root / "wds_digits_captions"
    rng = random.Random(1)
    samples = []
    for im, y in digit_images(200, 24):
        texts = [f"a photo of the digit {DIGITS[y]} " + " ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(2)]
        samples.append({"png": png(im), "txt": "\n".join(texts).encode()})
    write_split(captions / "test", samples, 12)
    (captions / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer over WORDS (<pad>=0, <unk>=1, <s>=2, </s>=3 around every text), an AutoTokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(folder))
    return folder


def tiny_model(tokenizer_dir: Path, folder: Path, seed: int = 0) -> Path:
    """A finished run (config.yaml, model/) of CLIP towers at 16 px that OpenCLIP's format can hold."""
    config = run_config(tokenizer_dir, image="clip_vision_model", text="clip_text_model", image_pooling="pooler_output",
                        text_pooling="eos")
    model, tokenizer = build(config, seed)
    return write_run(folder, config, model, tokenizer)
