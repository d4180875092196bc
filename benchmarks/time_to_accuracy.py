"""Time to accuracy on the demo: the plain demo against patch dropout with an unmasked finish.

Runs `configs/demo.yaml` as `make demo` does (2 CPU ranks under the `deepspeed` launcher,
ZeRO-2; no periodic evaluation, `train.eval_every=0`, so only training is timed), one run after
another on the same machine, and prints each run's zero-shot
top-1 on the held-out digits, its wall time (launch to exit) and its training-loop time
(the last `time` in metrics.jsonl), with ratios to the plain demo. Variants are
`name:override,override,...`; the default compares

    plain         the demo (30 epochs)
    pd0.5_e20     model.image.patch_dropout=0.5, 20 epochs, the last 20 steps unmasked
    plain_e20     20 epochs without patch dropout (the control: what the shorter schedule alone gives)

    python benchmarks/time_to_accuracy.py --work /tmp/tta [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEFAULT = ["plain:", "pd0.5_e20:model.image.patch_dropout=0.5,train.epochs=20,train.patch_dropout_final_steps=20",
           "plain_e20:train.epochs=20"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(data: Path, out: Path, overrides: list[str]) -> dict:
    """One demo launch; its zero-shot top-1, wall seconds and training-loop seconds."""
    shutil.rmtree(out, ignore_errors=True)
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "train.py"), "--config", str(REPO / "configs/demo.yaml"),
               "--deepspeed_config", str(REPO / "configs/ds/zero2.json"), f"output_dir={out}",
               f"data.train_shards={data}/train/{{00000..00002}}.tar", f"model.text.tokenizer={data}/tokenizer",
               f"eval.zeroshot_shards={data}/classification/00000.tar", f"eval.retrieval_shards={data}/val/00000.tar",
               "train.eval_every=0", *overrides]
    env = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    result = subprocess.run(command, cwd=REPO, env={**__import__("os").environ, **env}, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{out.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    loop = max(r["time"] for r in records if "loss" in r)
    return {"acc1": metrics["zeroshot/acc1"], "steps": metrics["steps"], "wall_s": wall, "loop_s": loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=DEFAULT, help="name:override,override,...")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"{cpu}, {__import__('os').cpu_count()} cores", flush=True)
    data = args.work / "demo"
    if not (data / "info.json").is_file():
        subprocess.run([str(BIN / "mmcl-demo-data"), "--out", str(data)], check=True)
    results = {}
    for variant in args.variants:
        name, _, overrides = variant.partition(":")
        results[name] = run(data, args.work / name, [o for o in overrides.split(",") if o])
        print(name, results[name], flush=True)
    base = results[next(iter(results))]
    print("\n| run | steps | zero-shot top-1 | wall s | loop s | wall ratio | loop ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['steps']} | {r['acc1']:.1%} | {r['wall_s']:.0f} | {r['loop_s']:.0f} | "
              f"{r['wall_s'] / base['wall_s']:.2f}x | {r['loop_s'] / base['loop_s']:.2f}x |")
    (args.work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
