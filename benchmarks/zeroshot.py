"""Zero-shot classification throughput: mmcl.evaluation vs the open_clip loop, side by side.

Both sides use the same open_clip model (random init unless --weights), the same shards,
the same image preprocessing (open_clip's val transform), batch size, DataLoader workers,
device and fp32 precision:

  open_clip  `open_clip.build_zero_shot_classifier` + a webdataset loop shaped like
             open_clip_train/zero_shot.py's `run` (model(image=...) -> features @ classifier
             -> top-1/top-5). The pipeline mirrors open_clip_train.data's webdataset stages;
             its own `tarfile_to_samples_nothrow` fails under webdataset 1.x (KeyError
             'fname' at the end-of-shard marker), so the stock `wds.tarfile_to_samples` is
             used in its place — patched here at benchmark time, not in site-packages.
  mmcl       `mmcl.evaluation`: build_eval_loader + build_zeroshot_classifier +
             extract_features + evaluate_zeroshot (what `mmcl-zeroshot` runs).

Without --data it writes synthetic JPEG shards (10 colour classes, 256 px) to a temp dir.
Prints a table: classifier seconds, image-pass seconds, images/s (image pass), CPU seconds
of the image pass (this process + its DataLoader workers; steadier than wall time on a shared
machine) and the ratios mmcl / open_clip. Each side runs --repeats times, alternating; the best run counts.

    python benchmarks/zeroshot.py --model ViT-B-32 --num-images 1024 --batch-size 64 --workers 1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import torch

CLASSNAMES = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (30, 220, 220), (220, 30, 220),
           (240, 240, 240), (15, 15, 15), (250, 150, 20), (120, 30, 160)]
TEMPLATES = ["a photo of a {c} thing.", "a {c} square.", "a blurry photo of something {c}.", "the colour {c}."]


def write_synthetic_shards(folder: Path, num_images: int, per_shard: int = 256, size: int = 256) -> str:
    """JPEG shards {key}.jpg + {key}.cls; returns a brace pattern over them."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, num_images, per_shard)):
        with tarfile.open(folder / f"{shards:05d}.tar", "w") as tar:
            for i in range(start, min(start + per_shard, num_images)):
                label = i % len(COLOURS)
                image = Image.new("RGB", (size, size), COLOURS[label])
                ImageDraw.Draw(image).ellipse((i % 97, i % 89, i % 97 + 60, i % 89 + 60), fill=(128, 128, 128))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for ext, data in (("jpg", buffer.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards:05d}}}.tar")


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined).

    Less sensitive than wall time to other jobs on a shared machine."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_open_clip(model, tokenizer, preprocess, shards: str, args) -> dict:
    """open_clip_train/zero_shot.py's shape over open_clip_train.data's webdataset stages."""
    import open_clip
    import webdataset as wds

    device = torch.device(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        templates = [t.replace("{c}", "{}") for t in TEMPLATES]
        classifier = open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=CLASSNAMES, templates=templates, num_classes_per_batch=10, device=device
        )
    classifier_s = time.perf_counter() - start
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),  # stands in for tarfile_to_samples_nothrow
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.to_tuple("jpg;png;jpeg;webp", "cls"),
        wds.map_tuple(preprocess, int),
        wds.batched(args.batch_size, partial=True),
    )
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=args.workers, persistent_workers=False)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    top1 = top5 = n = 0
    with torch.inference_mode():
        for images, target in loader:
            images, target = images.to(device), torch.as_tensor(target).to(device)
            output = model(image=images)
            features = output["image_features"] if isinstance(output, dict) else output[0]
            logits = 100.0 * features @ classifier
            pred = logits.topk(5, 1, True, True)[1].t()
            correct = pred.eq(target.view(1, -1).expand_as(pred))
            top1 += correct[:1].sum().item()
            top5 += correct[:5].sum().item()
            n += images.shape[0]
    del loader  # join the workers so their CPU time is counted
    images_s, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"classifier_s": classifier_s, "images_s": images_s, "cpu_s": cpu_s, "n": n, "acc1": top1 / n, "acc5": top5 / n}


def run_mmcl(eval_model, shards: str, args) -> dict:
    from mmcl.evaluation import build_zeroshot_classifier, evaluate_zeroshot, extract_features
    from mmcl.evaluation.data import build_eval_loader

    start = time.perf_counter()
    classifier = build_zeroshot_classifier(eval_model.encode_text, CLASSNAMES, TEMPLATES, batch_size=256)
    classifier_s = time.perf_counter() - start
    loader = build_eval_loader(shards, eval_model.transform, args.batch_size, args.workers)
    start, cpu_start = time.perf_counter(), cpu_seconds()
    images = extract_features(loader, eval_model.encode_image, device=args.device)
    metrics = evaluate_zeroshot(images["features"], images["label"], classifier)
    del loader
    images_s, cpu_s = time.perf_counter() - start, cpu_seconds() - cpu_start
    return {"classifier_s": classifier_s, "images_s": images_s, "cpu_s": cpu_s, "n": int(images["features"].shape[0]),
            "acc1": metrics["acc1"], "acc5": metrics["acc5"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--weights", default=None, help="local open_clip weights; default random init (speed does not depend on them)")
    parser.add_argument("--data", default=None, help="shards with .cls labels (brace pattern or dir); default: synthetic JPEG shards")
    parser.add_argument("--num-images", type=int, default=1024, help="synthetic images (default 1024)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers on both sides (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating; the best counts (default 3)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    import open_clip

    from mmcl.evaluation.loading import openclip_eval_model

    torch.manual_seed(0)
    eval_model = openclip_eval_model(args.model, args.weights, args.device)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.weights, device=args.device)
    model.eval()
    model.load_state_dict(eval_model.module.state_dict())  # identical weights on both sides
    tokenizer = open_clip.get_tokenizer(args.model)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.data
        if shards is None:
            shards = write_synthetic_shards(Path(tmp) / "shards", args.num_images)
        elif os.path.isdir(shards):
            names = sorted(p.name for p in Path(shards).glob("*.tar"))
            shards = str(Path(shards) / f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar") if len(names) > 1 else str(Path(shards) / names[0])
        results: dict[str, list[dict]] = {"open_clip": [], "mmcl": []}
        for _ in range(args.repeats):
            results["open_clip"].append(run_open_clip(model, tokenizer, preprocess, shards, args))
            results["mmcl"].append(run_mmcl(eval_model, shards, args))

    best = {side: min(runs, key=lambda r: r["images_s"]) for side, runs in results.items()}
    assert best["open_clip"]["n"] == best["mmcl"]["n"], "the two sides read different numbers of images"
    print(f"zero-shot classification, {args.model} fp32 on {args.device}, {best['mmcl']['n']} images, batch {args.batch_size}, "
          f"{args.workers} worker(s), {torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'pipeline':<10} {'classifier s':>12} {'images s':>9} {'images/s':>9} {'cpu s':>7} {'images/cpu-s':>12} {'acc1':>6} {'acc5':>6}")
    for side in ("open_clip", "mmcl"):
        r = best[side]
        print(f"{side:<10} {r['classifier_s']:>12.2f} {r['images_s']:>9.2f} {r['n'] / r['images_s']:>9.1f} "
              f"{r['cpu_s']:>7.1f} {r['n'] / r['cpu_s']:>12.2f} {r['acc1']:>6.3f} {r['acc5']:>6.3f}")
    ratio = best["open_clip"]["images_s"] / best["mmcl"]["images_s"]
    cpu_ratio = best["open_clip"]["cpu_s"] / best["mmcl"]["cpu_s"]
    print(f"ratio mmcl / open_clip: images/s {ratio:.2f}x, images per CPU-second {cpu_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results, "best": best, "ratio": ratio,
                                               "cpu_ratio": cpu_ratio}, indent=2))


if __name__ == "__main__":
    main()
