"""Text tower and pooling of the demo recipe: which choices train well, and which export exactly.

Trains the demo recipe (configs/demo.yaml: 4-layer CLIP image tower and a 2-layer text tower
from scratch, 2 CPU ranks, ZeRO-2, the real deepspeed launcher) with each text variant on
two datasets built offline, the demo digits and the coloured shapes
(benchmarks/shapes_dataset.py), and prints the held-out zero-shot top-1 of each run. Same
seed, same steps, same widths; only the text tower / pooling differ:

    bert:pooler_output   BERT, its pooler (class token -> dense -> tanh): exact in transformers
    bert:mean            BERT, mean over kept tokens: not exact
    bert:cls             BERT, class token's last hidden state: not exact
    clip:eos             CLIP text tower (pre-LN, causal), last kept token: exact in transformers

    python benchmarks/pooling.py --work /tmp/pooling [--variants bert:pooler_output clip:eos] [--datasets digits shapes]

Each run takes a few minutes on 2 cores; results are appended to <work>/results.jsonl, and a
run already in that file is not repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def datasets(work: Path) -> dict[str, dict[str, str]]:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from data_tools.demo_dataset import build_demo
    from shapes_dataset import build_shapes

    digits = work / "digits"
    build_demo(digits)
    shapes = build_shapes(work / "shapes")
    return {
        "digits": {"train": str(digits / "train" / "{00000..00002}.tar"), "val": str(digits / "val" / "00000.tar"),
                   "classification": str(digits / "classification" / "00000.tar"), "tokenizer": str(digits / "tokenizer")},
        "shapes": {key: shapes[key] for key in ("train", "val", "classification", "tokenizer")},
    }


def variant_config(variant: str, out: Path) -> Path:
    """configs/demo.yaml with the variant's text tower and pooling, written to `out`."""
    import yaml

    tower, pooling = variant.split(":")
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    text = config["model"]["text"]
    width = {k: text["config"][k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "intermediate_size", "max_position_embeddings")}
    text["config"] = {"model_type": "bert" if tower == "bert" else "clip_text_model", **width}
    text["pooling"] = pooling
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def train(data: dict[str, str], variant: str, out: Path) -> dict:
    config = variant_config(variant, out.parent / f"{out.name}.yaml")
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 300),
               str(REPO / "train.py"), "--config", str(config),
               "--deepspeed_config", str(REPO / "configs/ds/zero2.json"),
               f"model.text.tokenizer={data['tokenizer']}",
               f"data.train_shards={data['train']}", f"eval.zeroshot_shards={data['classification']}",
               f"eval.retrieval_shards={data['val']}", f"output_dir={out}", "train.checkpoint_every=0"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"zeroshot_top1": metrics["zeroshot/acc1"], "steps": metrics["steps"], "wall_s": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["bert:pooler_output", "bert:mean", "bert:cls", "clip:eos"])
    parser.add_argument("--datasets", nargs="+", default=["digits", "shapes"])
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results_file = args.work / "results.jsonl"
    done = {(r["dataset"], r["variant"]): r for r in map(json.loads, results_file.read_text().splitlines())} \
        if results_file.exists() else {}
    print(f"CPU: {platform.processor() or platform.machine()}; python {platform.python_version()}")
    sources = datasets(args.work)
    for dataset in args.datasets:
        for variant in args.variants:
            if (dataset, variant) in done:
                continue
            row = {"dataset": dataset, "variant": variant,
                   **train(sources[dataset], variant, args.work / "runs" / f"{dataset}_{variant.replace(':', '_')}")}
            done[(dataset, variant)] = row
            with results_file.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| dataset | text tower:pooling | zero-shot top-1 | steps | wall s |\n|---|---|---:|---:|---:|")
    for dataset in args.datasets:
        for variant in args.variants:
            r = done[(dataset, variant)]
            print(f"| {dataset} | {variant} | {r['zeroshot_top1']:.1%} | {r['steps']} | {r['wall_s']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
