"""Reinforced data (issue 26): training throughput and zero-shot accuracy of `distill` from a store
vs `distill` with the online teacher vs `clip` alone, on the shapes data of `distillation.py`.

1. Builds the shapes data and trains the teacher as `benchmarks/distillation.py` does (reused
   from --work when present).
2. Writes the teacher's reinforced store of the training shards: --augmentations crops per
   sample (scale 0.8-1.0 like the student's own crop, flips with p 0.5) and the teacher's
   features of each (until `mmcl curate reinforce` is merged, with tests/reinforced_store.py;
   its time is printed but is not the curate command's).
3. Trains the same student (ViT 64 x 2, BERT 64 x 1; same seed, data, schedule) three times side
   by side in each round (they share the machine's other load): clip alone, clip + distill with
   the teacher encoding every batch, clip + distill from the store (`distill.store`: no teacher).
4. Prints zero-shot top-1 on the held-out images and the training throughput (samples/s, the
   median of the logged windows after the first) as ratios to clip alone of the same round.

Every run is `python train.py` in one process (DeepSpeed, ZeRO-2, one rank, 1 data worker).

    python benchmarks/reinforced.py --work /tmp/reinforced_bench [--teacher-steps 300 --student-steps 150 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distillation import REPO, build_shapes, cpu_description, finish, run_config, start, train  # noqa: E402

RUNS = ("clip alone", "clip + distill, online teacher", "clip + distill, store")


def write_teacher_store(work: Path, data: Path, teacher: Path, augmentations: int, seed: int) -> Path:
    """The teacher's store of the training shards (written once per --work)."""
    store = work / f"store_k{augmentations}"
    if (store / "mmcl_curate.json").is_file():
        return store
    shutil.rmtree(store, ignore_errors=True)
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    from reinforced_store import build_store

    shards = sorted((data / "train").glob("*.tar"))
    started = time.time()
    build_store(store, str(data / "train" / f"{{00000..{len(shards) - 1:05d}}}.tar"), [teacher], augmentations, seed,
                crop_scale=(0.8, 1.0))
    print(f"store: {augmentations} crops per sample written in {time.time() - started:.0f} s "
          "(mmcl curate reinforce, one process)", flush=True)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--augmentations", type=int, default=4, help="stored crops per sample (K)")
    parser.add_argument("--train-images", type=int, default=4800)
    parser.add_argument("--held-out", type=int, default=960)
    parser.add_argument("--seed", type=int, default=0,
                        help="the students' seed (init, data order); also the teacher's and the store's when --work has none")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three runs side by side")
    args = parser.parse_args()
    print(cpu_description(), flush=True)
    data = build_shapes(args.work / "shapes", args.train_images, args.held_out)
    teacher_dir = args.work / "teacher"
    if not (teacher_dir / "model" / "model.safetensors").is_file():
        teacher = train(run_config(data, teacher_dir, 128, 4, 2, args.teacher_steps, args.seed), args.work / "teacher.yaml")
    else:
        teacher = {"acc1": json.loads((teacher_dir / "metrics.json").read_text()).get("zeroshot/acc1")}
    print("teacher", teacher, flush=True)
    store = write_teacher_store(args.work, data, teacher_dir / "model", args.augmentations, args.seed)
    settings = {RUNS[0]: ({"clip": 1.0}, None),
                RUNS[1]: ({"clip": 1.0, "distill": 1.0}, {"teacher": str(teacher_dir / "model")}),
                RUNS[2]: ({"clip": 1.0, "distill": 1.0}, {"store": str(store)})}
    results: dict[str, dict] = {}
    for number in range(1, args.rounds + 1):
        jobs = []
        for name in RUNS:
            out = args.work / f"seed{args.seed}_round{number}_{name.replace(' ', '_').replace(',', '').replace('+', 'plus')}"
            shutil.rmtree(out, ignore_errors=True)
            config = run_config(data, out, 64, 2, 1, args.student_steps, args.seed)
            config["objectives"], distill = settings[name]
            if distill:
                config["distill"] = distill
            jobs.append((name, start(config, out.with_suffix(".yaml"))))
        for name, job in jobs:
            results[f"{name} | {number}"] = finish(job)
            print(name, number, results[f"{name} | {number}"], flush=True)
    print(f"\nteacher: zero-shot top-1 {teacher['acc1']:.1%}; store: K = {args.augmentations}")
    print("\n| run | round | zero-shot top-1 | samples/s | vs clip alone, same round |\n|---|---|---:|---:|---:|")
    for key, r in results.items():
        name, number = key.split(" | ")
        base = results[f"{RUNS[0]} | {number}"]["samples_per_s"]
        print(f"| {name} | {number} | {r['acc1']:.1%} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}x |")
    (args.work / f"results_seed{args.seed}.json").write_text(json.dumps({"teacher": teacher, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
