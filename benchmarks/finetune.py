"""Fine-tuning without forgetting, measured: pre-train a small CLIP on shapes, adapt it to the digits.

No pretrained weights can be downloaded here, so the "pretrained" model is made here: the demo's
tiny CLIP towers (`configs/demo.yaml`) pre-trained on the shapes data (`benchmarks/shapes_dataset.py`,
12 classes) with one BPE tokenizer trained over the captions of both domains (`mmcl-train-tokenizer`),
so the digits' words are in its vocabulary from the start. That model is then adapted to the digits
(`mmcl-demo-data`, 10 new classes) by every method at the same number of steps, each a run of
`train.py` with `model.init_from` the pre-trained model dir, 2 CPU ranks under the real `deepspeed`
launcher (ZeRO-2), as `make demo` runs:

    zero-shot     the pre-trained model, no tuning
    full          every weight trains
    lora_r4/16    LoRA adapters (model.image.lora / model.text.lora) on both towers' attention q/v projections
                  (the default targets); heads and logit scale train
    lora_r*_emb   the same, plus an adapter on the text tower's token embedding (target_modules)
    lit           the image tower locked (model.image.lock: true); text tower and heads train
    flyp          FLYP: the labelled digits (.cls) with class-prompt captions (data.captions_from_labels)
    wise_<α>      WiSE-FT of the full fine-tune: `mmcl wise-ft --eval` at α = 0.25, 0.5, 0.75

Every model is classified zero-shot (`mmcl-zeroshot`, the class names and templates beside each
dataset) on the held-out digits (the target) and on the held-out shapes (retention of the
pre-training domain). Per run: trainable parameters (DeepSpeed's checkpoint `param_shapes`),
optimizer-state bytes (the Adam moments in the checkpoint's optimizer shards, all ranks), peak
memory (`memory/peak_gb` of metrics.jsonl: the largest peak RSS of the ranks) and step time
(median of the logged windows after the first). Prints a Markdown table; writes results.json
and the WiSE-FT plot into --work (and copies the plot to --plot when given).

    python benchmarks/finetune.py --work /tmp/ftev [--pretrain-steps 400] [--steps 150] [--methods ...] [--full-size]

--full-size adds the memory figure at full size: one ZeRO-2 step (2 CPU ranks, fp32, 4 images per
rank) of a random-init ViT-B/16 + 12-layer 512-wide text tower from inline configs, every weight
training vs LoRA r=16 on both towers: trainable parameters, optimizer state and peak RSS.

Finished runs are kept and reused (a run dir with model/ and metrics.json is not run again), so
a later call with more --methods adds rows; --fresh runs everything again. Methods whose config
keys this checkout does not have (LoRA, FLYP before they are merged) are skipped with a line.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
METHODS = ["full", "lora_r4", "lora_r16", "lora_r4_emb", "lora_r16_emb", "lit", "flyp"]
ALPHAS = [0.25, 0.5, 0.75]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(command: list[str], what: str) -> str:
    """Run a command with the benchmark's environment; stop with its output's tail when it fails."""
    result = subprocess.run([str(c) for c in command], cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def build_data(work: Path) -> dict[str, Path]:
    """The digits (target), the shapes (pre-training domain) and one tokenizer over both corpora."""
    digits, shapes, tokenizer = work / "digits", work / "shapes", work / "tokenizer"
    if not (digits / "info.json").is_file():
        call([BIN / "mmcl-demo-data", "--out", digits], "mmcl-demo-data")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from shapes_dataset import build_shapes

    build_shapes(shapes)
    if not (tokenizer / "tokenizer.json").is_file():
        call([BIN / "mmcl-train-tokenizer", "--shards", shapes / "train/{00000..00003}.tar",
              digits / "train/{00000..00002}.tar", "--out", tokenizer, "--model-type", "bpe", "--vocab-size", "512"],
             "mmcl-train-tokenizer")
    # the evaluation sets under their domain's name (the dataset name is the shards' folder)
    evals = work / "eval"
    evals.mkdir(exist_ok=True)
    for name, root in (("digits", digits), ("shapes", shapes)):
        if not (evals / name).exists():
            (evals / name).symlink_to(root / "classification", target_is_directory=True)
    return {"digits": digits, "shapes": shapes, "tokenizer": tokenizer,
            "eval_digits": evals / "digits" / "00000.tar", "eval_shapes": evals / "shapes" / "00000.tar"}


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def pretrain_config(data: dict[str, Path], out: Path, steps: int) -> dict:
    """configs/demo.yaml (tiny CLIP towers) on the shapes, with the two-domain tokenizer."""
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    return merge(config, {
        "model": {"text": {"tokenizer": str(data["tokenizer"])}},
        "data": {"train_shards": str(data["shapes"] / "train/{00000..00003}.tar")},
        "output_dir": str(out),
        "train": {"steps": steps, "eval_every": 0, "checkpoint_every": 0, "log_every": 20},
        "eval": {"zeroshot_shards": str(data["eval_shapes"]), "retrieval_shards": None},
    })


def finetune_config(data: dict[str, Path], pretrained: Path, out: Path, steps: int, lr: float) -> dict:
    """The digits from the pre-trained model dir: towers, heads, tokenizer and image transform come with init_from."""
    return {
        "model": {"init_from": str(pretrained)},
        "objectives": {"clip": 1.0},
        "data": {"train_shards": str(data["digits"] / "train/{00000..00002}.tar"), "train_crop_scale": [0.8, 1.0],
                 "shuffle_buffer": 500, "num_workers": 1},
        "output_dir": str(out),
        "seed": 0,
        "optim": {"lr": lr, "weight_decay": 0.1, "warmup_steps": 10, "schedule": "cosine"},
        "train": {"micro_batch_size": 64, "steps": steps, "log_every": 10, "eval_every": 0, "checkpoint_every": 0},
        "eval": {"zeroshot_shards": str(data["eval_digits"]), "batch_size": 180},
    }


def lora(rank: int, text_targets: list[str] | None = None) -> dict:
    """LoRA on both towers (default targets: the attention q/v projections); `text_targets` replaces the text side's."""
    side = {"rank": rank, "alpha": 2 * rank, "dropout": 0.0}
    text = dict(side, target_modules=text_targets) if text_targets else dict(side)
    return {"model": {"image": {"lora": side}, "text": {"lora": text}}}


def method_configs(data: dict[str, Path], args: argparse.Namespace) -> dict[str, tuple[dict, float]]:
    """Each method's config changes over the plain fine-tune, and its learning rate."""
    classification = data["digits"] / "classification"
    flyp = {"data": {"captions_from_labels": True},
            "eval": {"classnames": str(classification / "classnames.txt"), "templates": str(classification / "templates.json")}}
    # the digits' words never occur in the shapes captions, so their token embeddings are untrained: the
    # _emb variants also adapt the text tower's token embedding (peft LoRA on the nn.Embedding)
    emb = ["q_proj", "v_proj", "token_embedding"]
    return {"full": ({}, args.lr), "lora_r4": (lora(4), args.lora_lr), "lora_r16": (lora(16), args.lora_lr),
            "lora_r4_emb": (lora(4, emb), args.lora_lr), "lora_r16_emb": (lora(16, emb), args.lora_lr),
            "lit": ({"model": {"image": {"lock": True}}}, args.lr), "flyp": (flyp, args.lr)}


def supported(config: dict, path: Path) -> str | None:
    """None when this checkout's config loader takes `config`, else its one-line refusal."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    probe = ("import sys\nfrom mmcl.config import load_config\ntry:\n    load_config(sys.argv[1])\n"
             "except Exception as error:\n    print(str(error).splitlines()[0]); sys.exit(1)\n")
    result = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO, env={**os.environ, **ENV},
                            capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stdout.strip() or result.stderr.strip()[-300:])


def train(config: dict, out: Path, fresh: bool) -> float:
    """One run of train.py under the deepspeed launcher (2 CPU ranks, ZeRO-2); its wall seconds (0 if reused)."""
    if not fresh and (out / "model").is_dir() and (out / "metrics.json").is_file():
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_file = out.parent / f"{out.name}.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.time()
    call([BIN / "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), REPO / "train.py",
          "--config", config_file, "--deepspeed_config", REPO / "configs/ds/zero2.json"], f"training {out.name}")
    return time.time() - started


def zeroshot(model: Path, data: Path, out: Path) -> float:
    """Top-1 of `model` on the labelled shards `data` (class names and templates beside them); reused when newer than the model."""
    weights = model / "model.safetensors"
    if out.is_file() and weights.is_file() and out.stat().st_mtime > weights.stat().st_mtime:
        return float(json.loads(out.read_text())["metrics"]["acc1"])
    call([BIN / "mmcl-zeroshot", "--model", model, "--data", data, "--device", "cpu", "--workers", "1",
          "--batch-size", "256", "--output", out], f"mmcl-zeroshot {model} on {data}")
    return float(json.loads(out.read_text())["metrics"]["acc1"])


def run_facts(run: Path) -> dict[str, Any]:
    """Trainable parameters, optimizer-state bytes, peak memory and step time of a finished run."""
    import torch

    checkpoints = sorted((p for p in run.rglob("mp_rank_00_model_states.pt")), key=lambda p: p.stat().st_mtime)
    model_states = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    trainable = sum(shape.numel() for group in model_states["param_shapes"] for shape in group.values())
    state_bytes = 0
    for shard in checkpoints[-1].parent.glob("*optim_states.pt"):
        saved = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        state = saved.get("base_optimizer_state", saved)
        state = state.get("state", state) if isinstance(state, dict) else state
        for per_param in (state.values() if isinstance(state, dict) else state):
            state_bytes += sum(t.numel() * t.element_size() for t in per_param.values()
                               if torch.is_tensor(t) and t.dim() > 0)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r for r in records if "time/window_s" in r]
    per_step = [b["time/window_s"] / (b["step"] - a["step"]) for a, b in zip(windows, windows[1:])]
    return {"trainable": trainable, "optimizer_state_bytes": state_bytes,
            "peak_gb": max(r["memory/peak_gb"] for r in windows),
            "step_s": statistics.median(per_step) if per_step else None,
            "steps": json.loads((run / "metrics.json").read_text())["steps"]}


def wise_ft(pretrained: Path, full: Path, data: dict[str, Path], out: Path, fresh: bool) -> list[dict]:
    """`mmcl wise-ft --eval` over α ∈ {0, ALPHAS, 1}: the digits as target, the shapes held out."""
    info = out / "mmcl_wise_ft.json"
    if fresh or not info.is_file():
        command = [BIN / "mmcl", "wise-ft", "--zero-shot", pretrained, "--fine-tuned", full, "--out", out, "--overwrite"]
        for alpha in [0.0, *ALPHAS, 1.0]:
            command += ["--alpha", str(alpha)]
        command += ["--eval", "--data", data["eval_digits"], "--data", data["eval_shapes"], "--device", "cpu",
                    "--workers", "1", "--batch-size", "256"]
        print(call(command, "mmcl wise-ft"), flush=True)
    return json.loads(info.read_text())["sweep"]


def full_size_config(data: dict[str, Path], out: Path, lora_rank: int | None) -> dict:
    """ViT-B/16 + a 12-layer 512-wide text tower (CLIP ViT-B/16's shapes), inline configs, random init, one step."""
    vision = {"model_type": "clip_vision_model", "image_size": 224, "patch_size": 16, "num_channels": 3, "hidden_size": 768,
              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    text = {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 512, "num_hidden_layers": 12,
            "num_attention_heads": 8, "intermediate_size": 2048, "max_position_embeddings": 77}
    config = {
        "model": {"image": {"config": vision}, "text": {"config": text, "tokenizer": str(data["tokenizer"]), "context_length": 77},
                  "embed_dim": 512},
        "objectives": {"clip": 1.0},
        "data": {"train_shards": str(data["digits"] / "train/{00000..00002}.tar"), "image_size": 224,
                 "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "shuffle_buffer": 100, "num_workers": 1},
        "output_dir": str(out),
        "seed": 0,
        "optim": {"lr": 1e-4},
        "train": {"micro_batch_size": 4, "steps": 1, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
    }
    return config if lora_rank is None else merge(config, lora(lora_rank))


def full_size(data: dict[str, Path], work: Path, fresh: bool) -> dict[str, dict]:
    """Trainable parameters, optimizer state and peak RSS of one ZeRO-2 step at full size: full vs LoRA r=16."""
    rows = {}
    for name, rank in (("full", None), ("lora_r16", 16)):
        out = work / "runs" / f"full_size_{name}"
        config = full_size_config(data, out, rank)
        refusal = supported(config, work / "runs" / f"full_size_{name}.probe.yaml")
        if refusal:
            print(f"full size {name}: skipped, this checkout does not take its config ({refusal})", flush=True)
            continue
        wall = train(config, out, fresh)
        rows[name] = {"wall_s": wall, **run_facts(out)}
        print("full size", name, rows[name], flush=True)
    return rows


def full_size_table(rows: dict[str, dict]) -> str:
    full = rows.get("full", {})
    lines = ["| ViT-B/16 + 12-layer text, ZeRO-2, 2 ranks, 1 step | trainable params | optimizer state | vs full | peak RSS GB |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        ratio = f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.1%}" if full else "-"
        lines.append(f"| {name} | {r['trainable']:,} | {r['optimizer_state_bytes'] / 2**20:,.1f} MiB | {ratio} | {r['peak_gb']:.2f} |")
    return "\n".join(lines)


def cpu_facts() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    return (f"{name}, {os.cpu_count()} cores, AVX-512 BF16: {'yes' if 'avx512_bf16' in flags else 'no'}, "
            f"AMX-BF16: {'yes' if 'amx_bf16' in flags else 'no'}")


def table(rows: dict[str, dict], full_name: str = "full") -> str:
    full = rows.get(full_name, {})
    zero = rows["zero-shot"]
    lines = ["| method | lr | digits top-1 (target) | share of full's gain | shapes top-1 (retained) | of zero-shot's | "
             "trainable params | optimizer state | vs full | peak RSS GB | step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ordered = sorted(rows.items(), key=lambda item: item[0].startswith("wise_ft"))  # the WiSE-FT mixes last
    for name, r in ordered:
        if "trainable" in r:
            ratio = f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.1%}" if full.get("optimizer_state_bytes") else "-"
            cost = (f"{r['trainable']:,} | {r['optimizer_state_bytes'] / 2**20:.2f} MiB | {ratio} | {r['peak_gb']:.2f} | "
                    f"{r['step_s']:.2f}")
        else:
            cost = "0 | - | - | - | -" if name == "zero-shot" else "(as full) | - | - | - | -"
        lr = f"{r['lr']:g}" if r.get("lr") else "-"
        gain = f"{(r['digits'] - zero['digits']) / (full['digits'] - zero['digits']):.0%}" if full else "-"
        kept = f"{r['shapes'] / zero['shapes']:.0%}"
        lines.append(f"| {name} | {lr} | {r['digits']:.1%} | {gain} | {r['shapes']:.1%} | {kept} | {cost} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for data, runs and results")
    parser.add_argument("--pretrain-steps", type=int, default=400, help="pre-training steps on the shapes (global batch 128)")
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps of every method (global batch 128)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak lr of full, lit and flyp")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="peak lr of the LoRA runs")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--plot", type=Path, help="copy the WiSE-FT plot here")
    parser.add_argument("--full-size", action="store_true",
                        help="also one ZeRO-2 step of ViT-B/16 + 12-layer text (random init): full vs LoRA r=16")
    parser.add_argument("--fresh", action="store_true", help="run everything again instead of reusing finished runs")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(cpu_facts(), flush=True)
    started = time.time()
    data = build_data(args.work)
    pretrained_run = args.work / "runs" / "pretrain"
    wall = train(pretrain_config(data, pretrained_run, args.pretrain_steps), pretrained_run, args.fresh)
    print(f"pre-trained on shapes ({wall:.0f} s)", flush=True)
    pretrained = pretrained_run / "model"
    evals = args.work / "evals"
    rows: dict[str, dict] = {"zero-shot": {"digits": zeroshot(pretrained, data["eval_digits"], evals / "zero-shot_digits.json"),
                                           "shapes": zeroshot(pretrained, data["eval_shapes"], evals / "zero-shot_shapes.json")}}
    configs = method_configs(data, args)
    for name in [m for m in METHODS if m in args.methods]:
        extra, lr = configs[name]
        out = args.work / "runs" / name
        config = merge(finetune_config(data, pretrained, out, args.steps, lr), extra)
        refusal = supported(config, args.work / "runs" / f"{name}.probe.yaml")
        if refusal:
            print(f"{name}: skipped, this checkout does not take its config ({refusal})", flush=True)
            continue
        wall = train(config, out, args.fresh)
        rows[name] = {"lr": lr, "wall_s": wall, **run_facts(out),
                      "digits": zeroshot(out / "model", data["eval_digits"], evals / f"{name}_digits.json"),
                      "shapes": zeroshot(out / "model", data["eval_shapes"], evals / f"{name}_shapes.json")}
        print(name, rows[name], flush=True)
        if name == "full":
            sweep = wise_ft(pretrained, out / "model", data, args.work / "wise_ft", args.fresh)
            for point in sweep:
                if point["alpha"] in ALPHAS:
                    rows[f"wise_ft α={point['alpha']:g}"] = {"digits": point["per_dataset"]["digits"],
                                                             "shapes": point["per_dataset"]["shapes"]}
            rows["full"]["wise_ft_sweep"] = sweep
            if args.plot:
                shutil.copyfile(args.work / "wise_ft" / "wise_ft.png", args.plot)
    big = full_size(data, args.work, args.fresh) if args.full_size else {}
    print(f"\n{cpu_facts()}; total {time.time() - started:.0f} s\n")
    print(table(rows))
    if big:
        print("\n" + full_size_table(big))
    (args.work / "results.json").write_text(json.dumps({"cpu": cpu_facts(), "args": {k: str(v) for k, v in vars(args).items()},
                                                        "rows": rows, "full_size": big}, indent=2) + "\n")


if __name__ == "__main__":
    main()
