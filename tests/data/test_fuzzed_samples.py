"""Fuzzing: valid samples mutated in thousands of ways (truncated, bytes flipped, nested, inflated,
extensions swapped, wrong JSON types) stream through the real loaders and tools without an exception.

Hypothesis draws a plan (a mutation and a seed per sample); the mutated samples are written once
per plan as real tar shards and read by the training loader with 0 and 2 workers, the
evaluation loader, the shard inspector and the tokenizer trainer's caption reader. Every
mutation states what the training pipeline must make of it: delivered, skipped for a given
reason, or either (random byte flips).
"""
from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmcl.data import build_train_loader

SAMPLES_PER_PLAN = 600
SHARDS = 4
MAX_TEXT_BYTES = 8192
MAX_IMAGE_BYTES = 32768
MAX_PIXELS = 64 * 64
EITHER = "either"  # delivered or skipped, depending on where the bytes were hit
OK = "ok"


def _jpeg(seed: int, size=(40, 32)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG")
    return out.getvalue()


def _png16(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 65536, (32, 40), dtype=np.uint16)
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def _flip(data: bytes, rng: random.Random, n: int) -> bytes:
    buffer = bytearray(data)
    for _ in range(n):
        if buffer:
            buffer[rng.randrange(len(buffer))] ^= rng.randrange(1, 256)
    return bytes(buffer)


def _rename(files: dict, old: str, new: str) -> dict:
    files = dict(files)
    files[new] = files.pop(old)
    return files


# name -> mutate(files, rng) -> (files, what training must make of it)
def truncate_image(f, r):
    return {**f, "jpg": f["jpg"][: r.randrange(0, len(f["jpg"]) - 2)]}, "corrupt_image"


def flip_image_bytes(f, r):
    return {**f, "jpg": _flip(f["jpg"], r, r.randint(1, 8))}, EITHER


def image_garbage(f, r):
    return {**f, "jpg": r.randbytes(r.randint(1, 3000))}, "corrupt_image"


def truncate_caption(f, r):
    cut = r.randrange(len(f["txt"]))
    return {**f, "txt": f["txt"][:cut]}, "empty_caption" if not f["txt"][:cut].strip() else OK


def flip_caption_bytes(f, r):
    return {**f, "txt": _flip(f["txt"], r, r.randint(1, 4))}, EITHER


def nest_caption(f, r):
    depth = r.randint(1200, 4000)
    return {**f, "txt": b"[" * depth + b"]" * depth}, "bad_caption"


def nest_in_caption_list(f, r):
    depth = r.randint(1200, 3500)
    return {**f, "txt": b'["a cat", ' + b"[" * depth + b"]" * depth + b"]"}, "bad_caption"


def nest_dicts_in_caption_list(f, r):
    depth = r.randint(1100, 1300)  # 6 bytes a level: under MAX_TEXT_BYTES
    return {**f, "txt": b"[" + b'{"a":' * depth + b"1" + b"}" * depth + b"]"}, "bad_caption"


def huge_integer_caption(f, r):
    return {**f, "txt": b"[" + b"9" * r.randint(4400, 8000) + b"]"}, "bad_caption"


def inflate_caption(f, r):
    return {**f, "txt": f["txt"] * (MAX_TEXT_BYTES // len(f["txt"]) + r.randint(1, 50))}, "caption_too_large"


def caption_wrong_json_types(f, r):
    if r.random() < 0.5:
        return {**f, "txt": json.dumps([1, None, {"a": [2]}, True, 2.5]).encode()}, "empty_caption"
    return {**f, "txt": json.dumps(["a red car", 3, None, ["x"]]).encode()}, OK


def caption_not_utf8(f, r):
    return {**f, "txt": b"\xff\xfe" + f["txt"]}, "bad_caption_encoding"


def metadata_garbage(f, r):  # training never parses .json (the inspector does)
    choices = [b"[" * 5000, r.randbytes(200), b'{"key": [1, 2', b'["not", "a", "dict"]', b"{}" * 40000]
    return {**f, "json": r.choice(choices)}, OK


def bad_label(f, r):
    value = r.choice([b"seven", b"-1", b"9" * 30, b"[[[[", b"3.5", b"\xff\x00", b"", b"1e3", b"+3"])
    return {**f, "cls": value}, "bad_label"


def padded_label(f, r):
    return {**f, "cls": b" %d\n" % r.randint(0, 999)}, OK


def inflate_label(f, r):
    return {**f, "cls": b"1" + b" " * (MAX_TEXT_BYTES + r.randint(0, 100))}, "metadata_too_large"


def swap_image_and_caption(f, r):
    files = dict(f)
    files["jpg"], files["txt"] = f["txt"], f["jpg"]
    return files, "bad_caption_encoding"  # JPEG bytes are never UTF-8 (0xff)


def jpeg_named_png(f, r):
    return _rename(f, "jpg", "png"), OK


def image_with_unknown_extension(f, r):
    return _rename(f, "jpg", r.choice(["bin", "gif", "tiff", "jpgx"])), "missing_image"


def drop_caption(f, r):
    return {k: v for k, v in f.items() if k != "txt"}, "missing_caption"


def inflate_image(f, r):
    return {**f, "jpg": f["jpg"] + bytes(MAX_IMAGE_BYTES + r.randint(1, 1000) - len(f["jpg"]))}, "image_too_large"


def enlarge_image(f, r):
    return {**f, "jpg": _jpeg(r.randrange(10**6), size=(80, 80))}, "image_too_large"


def sixteen_bit_png(f, r):
    files = {k: v for k, v in f.items() if k != "jpg"}
    return {**files, "png": _png16(r.randrange(10**6))}, OK


def extra_members(f, r):
    return {**f, "npy": r.randbytes(r.randint(0, 100_000)), "seg.png": r.randbytes(50)}, OK


MUTATIONS = {fn.__name__: fn for fn in [
    truncate_image, flip_image_bytes, image_garbage, truncate_caption, flip_caption_bytes, nest_caption,
    nest_in_caption_list, nest_dicts_in_caption_list, huge_integer_caption, inflate_caption,
    caption_wrong_json_types, caption_not_utf8, metadata_garbage, bad_label, padded_label, inflate_label,
    swap_image_and_caption, jpeg_named_png, image_with_unknown_extension, drop_caption, inflate_image,
    enlarge_image, sixteen_bit_png, extra_members,
]}


def mutate(name: str, seed: int, files: dict) -> tuple[dict, str]:
    rng = random.Random(seed)
    if name == "unchanged":
        return files, OK
    if name == "two_at_once":
        first, second = rng.sample(sorted(MUTATIONS), 2)
        files, a = MUTATIONS[first](files, rng)
        try:
            files, b = MUTATIONS[second](files, rng)
        except KeyError:  # the first one removed the member the second mutates
            b = OK
        return files, OK if a == b == OK else EITHER
    return MUTATIONS[name](files, rng)


PLAN = st.lists(st.tuples(st.sampled_from(["unchanged", "two_at_once", *MUTATIONS]), st.integers(0, 2**32 - 1)),
                min_size=SAMPLES_PER_PLAN, max_size=SAMPLES_PER_PLAN)
FIGURES: list[dict] = []
_plans = itertools.count()


@settings(max_examples=5, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=PLAN)
def test_mutated_samples_are_delivered_once_or_skipped_by_reason_never_raised(plan, tmp_path_factory, kit, tokenizer):
    root = tmp_path_factory.mktemp(f"fuzz{next(_plans)}")
    expected: dict[str, str] = {}
    shards: list[list] = [[] for _ in range(SHARDS)]
    for index, (name, seed) in enumerate(plan):
        key = f"s{index:05d}"
        _, files = kit.good_sample(key, index, label=index % 10)
        files, expected[key] = mutate(name, seed, files)
        shards[index % SHARDS].append((key, files))
    for number, samples in enumerate(shards):
        kit.write_shard(root / f"{number:05d}.tar", samples)
    pattern = f"{root}/{{00000..{SHARDS - 1:05d}}}.tar"
    good = {k for k, e in expected.items() if e == OK}
    must_skip = Counter(e for e in expected.values() if e not in (OK, EITHER))

    results = {}
    for workers in (0, 2):
        cfg = kit.data_config(pattern, num_workers=workers, max_pixels=MAX_PIXELS, max_text_bytes=MAX_TEXT_BYTES,
                              max_image_bytes=MAX_IMAGE_BYTES)
        loader = build_train_loader(cfg, tokenizer, 16, batch_size=16, seed=0, exhaust=True)
        delivered = [k for batch in loader for k in batch["keys"]]
        skips = loader.skip_counts()
        assert len(delivered) == len(set(delivered)), "a sample was delivered twice"
        assert good <= set(delivered), f"good samples lost: {sorted(good - set(delivered))[:5]}"
        arrived = {k: (plan[int(k[1:])], expected[k]) for k in delivered if expected[k] not in (OK, EITHER)}
        assert not arrived, f"samples that must be skipped arrived: {list(arrived.values())[:5]}"
        assert sum(skips.values()) + len(delivered) == len(plan)
        assert all(skips.get(reason, 0) >= n for reason, n in must_skip.items()), (skips, must_skip)
        results[workers] = (sorted(delivered), skips)
    assert results[0] == results[2]  # the same samples and counts whatever the worker count
    delivered, skips = results[0]

    # The same shards through evaluation, the inspector and the tokenizer trainer: counted, never raised.
    from torchvision import transforms as T

    from data_tools.inspect_shards import inspect_shards
    from data_tools.train_tokenizer import captions_from_shards
    from mmcl.evaluation.data import build_eval_loader

    evaluation = build_eval_loader(pattern, T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()]),
                                   batch_size=32, num_workers=2, max_pixels=MAX_PIXELS)
    evaluated = sum(len(batch["index"]) for batch in evaluation)
    assert evaluated + sum(evaluation.skipped.values()) == len(plan)
    assert evaluation.skipped["bad_caption"] >= must_skip["bad_caption"]
    report = inspect_shards(pattern)
    assert report.samples == len(plan) and report.ok
    assert report.problems["bad_caption"] >= must_skip["bad_caption"]  # its limits are the defaults, not MAX_*
    skipped_captions: Counter = Counter()
    captions = captions_from_shards(pattern, skipped_captions)
    assert skipped_captions["bad_caption"] >= must_skip["bad_caption"] and len(captions) >= len(good)

    FIGURES.append({"samples": len(plan), "mutated": sum(name != "unchanged" for name, _ in plan),
                    "mutations": dict(Counter(name for name, _ in plan)), "good": len(good),
                    "delivered": len(delivered), "skipped": dict(skips), "eval_skipped": dict(evaluation.skipped),
                    "inspector_problems": dict(report.problems), "tokenizer_skipped": dict(skipped_captions)})


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    if FIGURES:
        total = Counter()
        for figures in FIGURES:
            total.update(figures["skipped"])
        print(f"\nfuzz: {len(FIGURES)} plans, {sum(f['samples'] for f in FIGURES)} samples, "
              f"{sum(f['mutated'] for f in FIGURES)} mutated, good {sum(f['good'] for f in FIGURES)}, "
              f"delivered {sum(f['delivered'] for f in FIGURES)} (0 and 2 workers alike), skipped {dict(total)}")
        for figures in FIGURES:
            print(json.dumps(figures, sort_keys=True))
