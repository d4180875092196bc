"""Data curation evidence (issue 26): score, filter, deduplicate, balance and reinforce a web-like corpus.

    python benchmarks/curation.py --work /tmp/curation_bench [--steps 250] [--student-steps 250] [--throughput-rounds 3]

On the corpus of `benchmarks/curation_corpus.py` (coloured shapes as JPEG shards: 30% mismatched
captions, 20% near-duplicates, 3 head classes 10x as frequent as the 9 tail classes; the ground
truth of every sample in truth.parquet), with the real command-line tools only (`mmcl-train`,
`mmcl curate score|select|reinforce`, `mmcl-zeroshot`), one process each:

1. trains the demo's towers (configs/demo.yaml: CLIP towers, 128 wide, image 4 layers, text 2
   layers; here on 8-px patches to fit the time budget) on the small clean part ("clean") and on
   all the web data ("all");
2. scores the web shards with both models (`mmcl curate score`) and selects with each rule
   (`mmcl curate select`): CLIP-score filtering with either scorer, SemDeDup, MetaCLIP balancing
   over metadata.txt, and all three together; every selection is compared with the ground truth
   (what it removed: precision and recall against the mismatched captions, the redundant
   duplicates) before any training;
3. trains the same towers, same seed, same number of steps, on each selection (`data.selection`);
   then scores the web shards again with the model trained on the clean-scorer filtered selection
   and filters with it (a second round of filtering, as data-filtering networks do), judged and
   trained on like the others;
4. reinforces the web shards with a teacher (the model trained on the clean-scorer filtered
   selection; `mmcl curate reinforce`), then trains a smaller student (configs/distill_demo.yaml's
   towers) three times, one run after another: `clip` alone, `clip` + `distill` with the online
   teacher, `clip` + `distill` reading the store (`distill.store`); the round of three is repeated
   (--throughput-rounds) for the throughput, which moves with the machine's load;
5. evaluates every model with `mmcl-zeroshot --confusion` on the balanced held-out set: top-1
   overall, on the 9 tail classes and on the 3 head classes; prints the tables (markdown) and
   writes <work>/results.json.

Every finished step leaves <work>/results/<step>.json (with a fingerprint of what it ran), so a
rerun skips it; a step that fails (e.g. a command not there yet) is reported as missing and the
rest still run. Nothing is written inside the repository.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "benchmarks"))

from curation_corpus import build_corpus

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}

MAIN_TOWERS = {  # configs/demo.yaml's towers on 8-px patches (16 tokens, not 64: ~1.7x less CPU per step)
    "image": {"config": {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "num_channels": 3,
                         "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256}},
    "text": {"config": {"model_type": "clip_text_model", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 32},
             "context_length": 16},
    "embed_dim": 128,
}
STUDENT_TOWERS = {  # configs/distill_demo.yaml
    "image": {"config": {"model_type": "clip_vision_model", "image_size": 32, "patch_size": 8, "num_channels": 3,
                         "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}},
    "text": {"config": {"model_type": "clip_text_model", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 32},
             "context_length": 16},
    "embed_dim": 64,
}


class StepFailed(RuntimeError):
    """A command of a step exited non-zero; the message is its last lines."""


def fingerprint(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def command(args: list[str], log: Path) -> tuple[float, str]:
    """Run a command (output to `log`); (wall seconds, output). Raises StepFailed on a non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = subprocess.run(args, cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.time() - started
    log.write_text(" ".join(args) + "\n\n" + result.stdout)
    if result.returncode != 0:
        tail = [line for line in result.stdout.splitlines() if line.strip()][-3:]
        raise StepFailed(f"exit {result.returncode}: " + " | ".join(tail))
    return wall, result.stdout


class Bench:
    def __init__(self, work: Path, steps: int, student_steps: int):
        self.work = work
        self.steps = steps
        self.student_steps = student_steps
        self.results_dir = work / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.missing: dict[str, str] = {}

    # ----------------------------------------------------------------- caching
    def cached(self, name: str, spec: dict, run) -> dict | None:
        """The step's result: from <work>/results/<name>.json when it ran with the same spec, else run it."""
        path = self.results_dir / f"{name}.json"
        key = fingerprint({"spec": spec, "corpus": self.corpus["options"]})
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("fingerprint") == key:
                return previous
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        load = load_average()
        try:
            result = run()
        except StepFailed as error:
            self.missing[name] = str(error)
            print(f"  {name}: FAILED {error}", flush=True)
            return None
        result.update(fingerprint=key, load_before=load, load_after=load_average())
        path.write_text(json.dumps(result, indent=2) + "\n")
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()
                 if not isinstance(v, (dict, list)) and k not in ("printed", "file", "dir", "model", "fingerprint")}
        print(f"  {name}: {json.dumps(brief)}", flush=True)
        return result

    # ----------------------------------------------------------------- training
    def config(self, name: str, towers: dict, steps: int, *, selection: Path | None = None,
               distill: dict | None = None, shards: str | None = None) -> dict:
        corpus = self.corpus
        model = json.loads(json.dumps(towers))
        model["text"]["tokenizer"] = corpus["tokenizer"]
        data = {"train_shards": shards or corpus["web"], "image_size": 32, "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3, "train_crop_scale": [0.8, 1.0], "shuffle_buffer": 1000, "num_workers": 1}
        if selection is not None:
            data["selection"] = str(selection)
        config = {
            "model": model, "objectives": {"clip": 1.0}, "data": data, "output_dir": str(self.work / "runs" / name),
            "seed": 0, "optim": {"lr": 1.0e-3, "weight_decay": 0.1, "warmup_steps": max(1, steps // 15), "schedule": "cosine"},
            "train": {"micro_batch_size": 64, "steps": steps, "log_every": max(1, steps // 10), "checkpoint_every": 0},
        }
        if distill is not None:
            config["objectives"] = {"clip": 1.0, "distill": 1.0}
            config["distill"] = distill
        return config

    def train(self, name: str, config: dict, evaluate: bool = True) -> dict | None:
        def run() -> dict:
            out = Path(config["output_dir"])
            if out.exists():  # a stale or half-finished run of this benchmark: start it afresh
                import shutil
                shutil.rmtree(out)
            path = self.work / "configs" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            wall, _ = command([str(BIN / "mmcl-train"), "--config", str(path)], self.work / "logs" / f"train_{name}.log")
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            windows = [r for r in records if "samples_per_s" in r]
            speeds = [r["samples_per_s"] for r in windows][1:]  # the first window holds the start-up
            waits = [r["time/data_wait_fraction"] for r in windows[1:] if "time/data_wait_fraction" in r]
            metrics = json.loads((out / "metrics.json").read_text())
            first, last = windows[0] if windows else {}, windows[-1] if windows else {}
            span = (last.get("time", 0) - first.get("time", 0)) if len(windows) > 1 else 0
            return {"model": str(out / "model"), "steps": metrics.get("steps"), "samples_seen": metrics.get("samples_seen"),
                    "samples_per_s": statistics.median(speeds) if speeds else None,
                    # samples over the loop time after the first window: one figure for the whole run
                    "loop_samples_per_s": (last["samples"] - first["samples"]) / span if span > 0 else None,
                    "data_wait": statistics.mean(waits) if waits else None,
                    "loop_s": records[-1].get("time") if records else None, "wall_s": round(wall, 1),
                    "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}

        trained = self.cached(f"train_{name}", config, run)
        if trained is None or not evaluate:
            return trained
        evaluated = self.zeroshot(name, trained["model"], trained["fingerprint"])
        return {**trained, **(evaluated or {})}

    def zeroshot(self, name: str, model: str, model_fingerprint: str) -> dict | None:
        corpus = self.corpus

        def run() -> dict:
            output = self.work / "zeroshot" / f"{name}.json"
            command([str(BIN / "mmcl-zeroshot"), "--model", model, "--data", corpus["classification"], "--confusion",
                     "--device", "cpu", "--workers", "1", "--batch-size", "256", "--output", str(output)],
                    self.work / "logs" / f"zeroshot_{name}.log")
            metrics = json.loads(output.read_text())["metrics"]
            confusion = metrics["confusion_matrix"]
            classes = corpus["classnames"]

            def accuracy(names: list[str]) -> float:
                rows = [classes.index(c) for c in names]
                return sum(confusion[i][i] for i in rows) / sum(sum(confusion[i]) for i in rows)

            return {"acc1": metrics["acc1"], "tail_acc1": accuracy(corpus["tail_classes"]),
                    "head_acc1": accuracy(corpus["head_classes"]),
                    "per_class": {c: accuracy([c]) for c in classes}}

        return self.cached(f"zeroshot_{name}", {"model": model_fingerprint}, run)

    # ----------------------------------------------------------------- curation commands
    def score(self, scorer: str, model: str, model_fingerprint: str) -> dict | None:
        out = self.work / "scores" / scorer

        def run() -> dict:
            import shutil
            shutil.rmtree(out, ignore_errors=True)  # the scorer changed: score afresh
            wall, _ = command([str(BIN / "mmcl"), "curate", "score", "--model", model, "--shards", self.corpus["web"],
                               "--out", str(out), "--batch-size", "256", "--workers", "1"],
                              self.work / "logs" / f"score_{scorer}.log")
            table = self.read_parts(out)
            return {"dir": str(out), "rows": table.num_rows, "wall_s": round(wall, 1),
                    "samples_per_s": round(table.num_rows / wall, 1)}

        return self.cached(f"score_{scorer}", {"model": model_fingerprint, "shards": self.corpus["web"]}, run)

    @staticmethod
    def read_parts(folder: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        return pa.concat_tables([pq.read_table(p) for p in sorted((folder / "parts").glob("*.parquet"))])

    def select(self, name: str, scores: dict, rules: list[str]) -> dict | None:
        out = self.work / "selections" / f"{name}.parquet"

        def run() -> dict:
            wall, stdout = command([str(BIN / "mmcl"), "curate", "select", "--scores", scores["dir"], *rules,
                                    "--out", str(out), "--overwrite"], self.work / "logs" / f"select_{name}.log")
            return {"file": str(out), "rules": " ".join(rules), "wall_s": round(wall, 1), "printed": stdout.strip()[-2000:],
                    **self.judge(out)}

        return self.cached(f"select_{name}", {"scores": scores["fingerprint"], "rules": rules}, run)

    def judge(self, selection: Path) -> dict:
        """What a selection removed, against the ground truth.

        filter: precision/recall of the removed samples against the mismatched pairs;
        dedup: a removal is right when its near-duplicate group keeps at least one other sample
        (per group: min(removed, size - 1) right removals); recall over sum(size - 1);
        balancing: the expected per-epoch draw (sum of probabilities) and the tail's share of it.
        """
        import pyarrow.parquet as pq

        truth = pq.read_table(self.corpus["truth"]).to_pandas()
        chosen = pq.read_table(selection, columns=["key", "probability"]).to_pandas()
        probability = dict(zip(chosen["key"], chosen["probability"]))
        truth["p"] = truth["key"].map(probability).fillna(0.0)
        removed = truth["p"] == 0.0
        mismatched = truth["mismatched"]
        groups = truth.groupby("group").agg(size=("key", "size"), removed=("p", lambda p: int((p == 0).sum())))
        groups = groups[groups["size"] > 1]
        right_dedup = int(groups.apply(lambda g: min(g["removed"], g["size"] - 1), axis=1).sum()) if len(groups) else 0
        redundant = int((groups["size"] - 1).sum())
        n_removed = int(removed.sum())

        def ratio(a: float, b: float) -> float | None:
            return a / b if b else None

        expected = float(truth["p"].sum())
        return {
            "selected": int((truth["p"] > 0).sum()), "removed": n_removed, "expected_per_epoch": round(expected, 1),
            "removed_mismatched": int((removed & mismatched).sum()), "mismatched": int(mismatched.sum()),
            "filter_precision": ratio(int((removed & mismatched).sum()), n_removed),
            "filter_recall": ratio(int((removed & mismatched).sum()), int(mismatched.sum())),
            "removed_redundant_duplicates": right_dedup, "redundant_duplicates": redundant,
            "dedup_precision": ratio(right_dedup, n_removed), "dedup_recall": ratio(right_dedup, redundant),
            "removed_clean_unique": int((removed & ~mismatched & ~truth["duplicate"]).sum()),
            "tail_share": ratio(float(truth.loc[truth["tail"], "p"].sum()), expected),
            "mismatched_share": ratio(float(truth.loc[mismatched, "p"].sum()), expected),
        }

    def neighbours(self, scores: dict) -> dict:
        """How far the scorer's image embeddings tell a near-duplicate from another image of its class:
        the cosine of each copy to its original, and of each original to its nearest other original."""
        import numpy as np
        import pyarrow.parquet as pq

        table = self.read_parts(Path(scores["dir"]))
        keys = table.column("key").to_pylist()
        flat = table.column("image_embedding").combine_chunks()
        embeddings = np.asarray(flat.values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(keys), -1)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        row = {k: i for i, k in enumerate(keys)}
        truth = pq.read_table(self.corpus["truth"]).to_pandas()
        copies = truth[truth["duplicate"]]
        pairs = np.einsum("ij,ij->i", embeddings[[row[k] for k in copies["key"]]],
                          embeddings[[row[k] for k in copies["duplicate_of"]]])
        originals = embeddings[[row[k] for k in truth.loc[~truth["duplicate"], "key"]]]
        similarity = originals @ originals.T
        np.fill_diagonal(similarity, -1.0)
        nearest = similarity.max(axis=1)
        return {"copy_to_original": np.quantile(pairs, [0.1, 0.5, 0.9]).round(4).tolist(),
                "original_to_nearest_original": np.quantile(nearest, [0.1, 0.5, 0.9]).round(4).tolist()}

    def reinforce(self, teacher: dict, augmentations: int) -> dict | None:
        out = self.work / "store"

        def run() -> dict:
            import shutil
            shutil.rmtree(out, ignore_errors=True)
            wall, _ = command([str(BIN / "mmcl"), "curate", "reinforce", "--teacher", teacher["model"], "--shards",
                               self.corpus["web"], "--augmentations", str(augmentations), "--out", str(out),
                               "--crop-scale", "0.8", "1.0",  # the online runs' data.train_crop_scale
                               "--batch-size", "256", "--workers", "1"], self.work / "logs" / "reinforce.log")
            table = self.read_parts(out)
            return {"dir": str(out), "rows": table.num_rows, "wall_s": round(wall, 1)}

        return self.cached("reinforce", {"teacher": teacher["fingerprint"], "k": augmentations,
                                         "shards": self.corpus["web"]}, run)


def fmt(value, kind: str = "pct") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "int":
        return f"{value:,}"
    return f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/curation_bench"))
    parser.add_argument("--steps", type=int, default=250, help="training steps x 64 of every main-tower run (default 250)")
    parser.add_argument("--student-steps", type=int, default=250, help="training steps of the reinforced-data students")
    parser.add_argument("--originals", type=int, default=3900, help="distinct web images in the corpus (default 3900)")
    parser.add_argument("--keep-fraction", type=float, default=0.7, help="CLIP-score filter: top fraction kept (default 0.7)")
    parser.add_argument("--dedup-threshold", type=float, default=0.998,
                        help="SemDeDup cosine threshold (default 0.998: removes about the corpus's share of copies)")
    parser.add_argument("--balance-threshold", type=float, default=50, help="MetaCLIP t: matches kept per entry and epoch")
    parser.add_argument("--augmentations", type=int, default=4, help="stored augmentations per sample (default 4)")
    parser.add_argument("--throughput-rounds", type=int, default=3,
                        help="times the three student runs are repeated, back to back, for their throughput (default 3)")
    parser.add_argument("--skip-training", action="store_true", help="only the scores, selections and their ground-truth checks")
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu}, {os.cpu_count()} cores; load average {load_average()}", flush=True)
    started = time.time()

    bench = Bench(args.work, args.steps, args.student_steps)
    bench.corpus = build_corpus(args.work / "corpus", originals=args.originals)
    c = bench.corpus
    runs: dict[str, dict | None] = {}
    selections: dict[str, dict | None] = {}
    train = not args.skip_training

    # 1. the scoring models
    runs["clean"] = bench.train("clean", bench.config("clean", MAIN_TOWERS, args.steps, shards=c["clean"]))
    runs["all"] = bench.train("all", bench.config("all", MAIN_TOWERS, args.steps))
    scores = {}
    for scorer in ("clean", "all"):
        if runs[scorer]:
            scores[scorer] = bench.score(scorer, runs[scorer]["model"], runs[scorer]["fingerprint"])

    # 2. selections, judged against the ground truth (no training)
    balance = ["--metadata", c["metadata"], "--balance-threshold", f"{args.balance_threshold:g}"]
    dedup = ["--dedup-threshold", f"{args.dedup_threshold:g}"]
    keep = ["--keep-fraction", f"{args.keep_fraction:g}"]
    plan = {  # name: (scores, rules)
        "filter_clean": ("clean", keep), "filter_all": ("all", keep), "dedup": ("clean", dedup),
        "balanced": ("clean", balance), "all_three": ("clean", keep + dedup + balance),
    }
    sweep = {f"filter_clean_keep{f:g}": ("clean", ["--keep-fraction", f"{f:g}"]) for f in (0.6, 0.65, 0.75, 0.8)}
    sweep.update({f"filter_all_keep{f:g}": ("all", ["--keep-fraction", f"{f:g}"]) for f in (0.6, 0.8)})
    sweep.update({f"dedup_{t:g}": ("clean", ["--dedup-threshold", f"{t:g}"]) for t in (0.99, 0.995, 0.999)})
    for name, (scorer, rules) in {**plan, **sweep}.items():
        if scores.get(scorer):
            selections[name] = bench.select(name, scores[scorer], rules)

    # 3. training on each selection, same towers, seed and steps
    if train:
        for name in plan:
            if selections.get(name):
                runs[name] = bench.train(name, bench.config(name, MAIN_TOWERS, args.steps,
                                                            selection=Path(selections[name]["file"])))

    # 3b. the filtered model as a scorer: does a better scorer filter better (and train better)?
    if train and runs.get("filter_clean"):
        scores["filtered"] = bench.score("filtered", runs["filter_clean"]["model"], runs["filter_clean"]["fingerprint"])
        if scores["filtered"]:
            selections["filter_filtered"] = bench.select("filter_filtered", scores["filtered"], keep)
            for f in (0.65, 0.72, 0.75, 0.8):
                selections[f"filter_filtered_keep{f:g}"] = bench.select(f"filter_filtered_keep{f:g}", scores["filtered"],
                                                                        ["--keep-fraction", f"{f:g}"])
            if selections["filter_filtered"]:  # a second round of filtering: trained on like the others
                runs["filter_filtered"] = bench.train("filter_filtered", bench.config(
                    "filter_filtered", MAIN_TOWERS, args.steps, selection=Path(selections["filter_filtered"]["file"])))

    # 4. reinforced data: teacher = the clean-scorer filtered model; three student runs back to back
    students: dict[tuple[str, int], dict | None] = {}
    teacher = runs.get("filter_clean")
    if train and teacher:
        store = bench.reinforce(teacher, args.augmentations)
        variants = [("clip", "student_clip", None), ("distill, online teacher", "student_distill_online",
                                                      {"teacher": teacher["model"]})]
        if store:
            variants.append(("distill, store", "student_distill_store", {"store": store["dir"]}))
        # Round 1 is evaluated; later rounds repeat the runs (same seed: the same training) for the throughput only.
        for number in range(1, args.throughput_rounds + 1):
            for label, name, distill in variants:
                name = name if number == 1 else f"{name}_round{number}"
                students[(label, number)] = bench.train(name, bench.config(name, STUDENT_TOWERS, args.student_steps,
                                                                           distill=distill), evaluate=number == 1)

    # ----------------------------------------------------------------- tables
    lines = [f"CPU: {cpu}, {os.cpu_count()} cores; this invocation {time.time() - started:.0f} s", ""]
    lines += [("Selections against the ground truth (web corpus: "
              f"{c['counts']['web']:,} samples, {c['counts']['web_mismatched']:,} mismatched, "
              f"{c['counts']['web_duplicates']:,} near-duplicate copies):"), "",
              ("| selection | scorer | rules | kept | per-epoch draw | removed | of which mismatched | of which redundant copies "
              "| other | filter precision | filter recall | dedup precision | dedup recall | tail share of draw "
              "| mismatched share of draw |"),
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    truth_tail = sum(c["counts"]["web_per_class"][k] for k in c["tail_classes"]) / c["counts"]["web"]
    lines.append(f"| (none: all data) | - | - | {c['counts']['web']:,} | {c['counts']['web']:,} | 0 | 0 | 0 | 0 | - | - | - | - "
                 f"| {truth_tail:.1%} | {c['counts']['web_mismatched'] / c['counts']['web']:.1%} |")
    for name, s in selections.items():
        if s is None:
            lines.append(f"| {name} | missing | | | | | | | | | | | | | |")
            continue
        rules = s["rules"].replace(c["metadata"], "metadata.txt")
        scorer = "clean" if name in ("dedup", "balanced", "all_three") or name.startswith(("filter_clean", "dedup_")) else \
            "filtered" if name.startswith("filter_filtered") else "all"
        lines.append(f"| {name} | {scorer} | `{rules}` | {s['selected']:,} | {s['expected_per_epoch']:,.0f} | {s['removed']:,} | "
                     f"{s['removed_mismatched']:,} | {s['removed_redundant_duplicates']:,} | {s['removed_clean_unique']:,} | "
                     f"{fmt(s['filter_precision'])} | {fmt(s['filter_recall'])} | {fmt(s['dedup_precision'])} | "
                     f"{fmt(s['dedup_recall'])} | {fmt(s['tail_share'])} | {fmt(s['mismatched_share'])} |")
    lines += ["", (f"Zero-shot top-1 on {c['counts']['classification']} balanced held-out images "
              f"({len(c['classnames'])} classes; tail = {len(c['tail_classes'])} classes), {args.steps} steps x 64, seed 0:"), "",
              "| training data | zero-shot top-1 | tail classes | head classes | final loss | samples/s | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"clean": "small clean part only (the clean scorer)", "all": "all web data",
              "filter_clean": "CLIP-score filtered (clean-part scorer)", "filter_all": "CLIP-score filtered (all-data scorer)",
              "filter_filtered": "CLIP-score filtered (scorer: the model trained on the clean-part filtered data)",
              "dedup": "deduplicated (SemDeDup)", "balanced": "balanced (MetaCLIP)", "all_three": "filtered + deduplicated + balanced"}
    for name, label in labels.items():
        r = runs.get(name)
        if r is None or "acc1" not in r:
            lines.append(f"| {label} | missing | | | | | |")
            continue
        lines.append(f"| {label} | {fmt(r['acc1'])} | {fmt(r['tail_acc1'])} | {fmt(r['head_acc1'])} | "
                     f"{r['final_loss']:.3f} | {fmt(r['samples_per_s'], 'f')} | {r['wall_s']:.0f} |")
    if students:
        lines += ["", (f"Reinforced data: student (64 wide; image 2 layers on 8-px patches, text 1 layer), {args.student_steps} "
                  f"steps x 64 on all web data, `clip: 1` (+ `distill: 1`); the runs of a round one after another; teacher = "
                  f"the clean-scorer filtered model ({fmt((teacher or {}).get('acc1'))}); store: {args.augmentations} "
                  "augmentations per sample, crop scale 0.8-1 as the online runs:"), "",
                  ("| student run | round | zero-shot top-1 | tail classes | samples/s (median of windows) | vs clip | "
                  "samples/s (loop) | vs clip | data wait | load avg before/after |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for (label, number), r in students.items():
            if r is None:
                lines.append(f"| {label} | {number} | missing | | | | | | | |")
                continue
            base = students.get(("clip", number)) or {}

            def ratio(key: str, r: dict = r, base: dict = base) -> str:
                return f"{r[key] / base[key]:.2f}x" if base.get(key) and r.get(key) else "-"

            lines.append(f"| {label} | {number} | {fmt(r.get('acc1'))} | {fmt(r.get('tail_acc1'))} | "
                         f"{fmt(r['samples_per_s'], 'f')} | {ratio('samples_per_s')} | {fmt(r.get('loop_samples_per_s'), 'f')} | "
                         f"{ratio('loop_samples_per_s')} | {fmt(r.get('data_wait'))} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    if scores.get("clean"):
        near = bench.neighbours(scores["clean"])
        lines += ["", ("SemDeDup's view (the clean scorer's image embeddings; 10th / 50th / 90th percentile): cosine of each "
                  f"near-duplicate copy to its original {near['copy_to_original']}; of each original to its nearest other "
                  f"original {near['original_to_nearest_original']}.")]
    timing = [f"{n}: {s['rows']:,} samples in {s['wall_s']:.0f} s ({s['samples_per_s']:.0f} samples/s, 1 rank, process start included)"
              for n, s in scores.items() if s]
    if timing:
        lines += ["", "Scoring (`mmcl curate score`): " + "; ".join(timing)]
    if bench.missing:
        lines += ["", "Missing (the step failed; see <work>/logs):"] + [f"- {k}: {v}" for k, v in bench.missing.items()]
    report = "\n".join(lines)
    print("\n" + report)
    (args.work / "results.json").write_text(json.dumps({"runs": runs, "selections": selections, "students": {f"{label}, round {n}": r for (label, n), r in students.items()},
                                                          "missing": bench.missing, "corpus": c["counts"]}, indent=2) + "\n")
    (args.work / "report.md").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
