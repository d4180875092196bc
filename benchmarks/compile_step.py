"""`train.compile`: the training step with compiled towers vs the same step eager, side by side.

Both contenders are mmcl's real step (`plain_step` on a DeepSpeed ZeRO-1 engine, one process),
built from the same seed; one of them has its towers compiled in place with
`mmcl.engine.compile.compile_towers` (inductor), exactly as `train.compile: true` does.
The model is the tiny CLIP of benchmarks/train_step.py (`--model tiny`: transformers CLIP
towers, 6.8 M parameters, 64-px images) or the CLIP of patch_dropout.py whose 128-px ViT
dominates the step (`--model vit`, with `--patch-dropout`). Compilation happens in the
warm-up and is reported separately. Steps are timed in alternation (eager, compiled, eager,
...) so both see the same background load.

    python benchmarks/compile_step.py [--model tiny] [--batch 128] [--steps 8] [--precision fp32 bf16] [--attn sdpa]
    python benchmarks/compile_step.py --model vit --batch 32 --patch-dropout 0.5 --attn auto
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import train_step  # noqa: E402  (benchmarks/ is on sys.path when this file is run)


def cpu_report() -> tuple[str, bool]:
    """(one line naming the CPU and its bf16 matrix support, whether bf16 figures mean anything here)."""
    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    avx512_bf16, amx = "avx512_bf16" in flags, "amx_bf16" in flags
    line = (f"CPU: {model}; AVX-512 BF16: {'yes' if avx512_bf16 else 'no'}; AMX-BF16: {'yes' if amx else 'no'}; "
            f"AVX-512F: {'yes' if 'avx512f' in flags else 'no'}")
    return line, avx512_bf16 or amx


def build_step(model: str, precision: str, attn: str, compiled: bool, batch: dict, drop: float = 0.0):
    """step(batch) -> its loss; `model`: "tiny" (train_step.py's CLIP) or "vit" (patch_dropout.py's, patch dropout `drop`)."""
    if model == "vit":
        import patch_dropout

        return patch_dropout.mmcl_step_fn(precision, attn, drop, batch, compiled=compiled)[0]
    return build_tiny_step(precision, attn, compiled)


def build_tiny_step(precision: str, attn: str, compiled: bool):
    """(step(batch), compiled?) on a fresh ZeRO-1 engine; same seed, so both contenders start equal."""
    import deepspeed

    from mmcl.engine.compile import compile_towers
    from mmcl.engine.runtime import init_process_group
    from mmcl.engine.steps import plain_step
    from mmcl.engine.task import TrainingTask
    from mmcl.models import build_model

    init_process_group()
    torch.manual_seed(0)
    task = TrainingTask(build_model(train_step_config(attn)), {"clip": 1.0})
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
                 "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    if compiled:
        compile_towers(task.model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step(batch):
        metrics, _ = plain_step(engine, [{**batch, "pixel_values": batch["pixel_values"].to(dtype)}])
        return float(metrics["loss"]) if metrics is not None else float("nan")

    return step


def train_step_config(attn: str):
    """benchmarks/train_step.py's mmcl model config (the same tiny CLIP)."""
    from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig

    w = train_step
    common = dict(hidden_size=w.WIDTH, num_hidden_layers=w.LAYERS, num_attention_heads=w.HEADS,
                  intermediate_size=4 * w.WIDTH, hidden_act="gelu", attention_dropout=0.0)
    return ModelConfig(
        image=TowerConfig(config=dict(model_type="clip_vision_model", image_size=w.IMAGE, patch_size=w.PATCH, **common),
                          pooling="pooler_output", attn_implementation=attn),
        text=TextTowerConfig(config=dict(model_type="clip_text_model", vocab_size=w.VOCAB, max_position_embeddings=w.CONTEXT,
                                         eos_token_id=w.VOCAB - 1, **common),
                             tokenizer="unused", context_length=w.CONTEXT, pooling="eos", attn_implementation=attn),
        embed_dim=w.EMBED,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "vit"], default="tiny")
    parser.add_argument("--patch-dropout", type=float, default=0.0, help="--model vit only")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="alternating timed rounds")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--attn", nargs="+", default=["sdpa"], help="--model vit also takes auto (as the trainer picks)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu, bf16_ok = cpu_report()
    print(cpu)
    print(f"torch {torch.__version__}, {args.threads} threads, model {args.model}, batch {args.batch}, "
          f"patch_dropout {args.patch_dropout:g}")
    if args.model == "vit":
        import patch_dropout

        batch = patch_dropout.synthetic_batch(args.batch)
    else:
        batch = train_step.synthetic_batch(args.batch)
    rows = []
    for precision in args.precision:
        for attn in args.attn:
            eager, compiled = (build_step(args.model, precision, attn, flag, batch, args.patch_dropout)
                               for flag in (False, True))
            torch.manual_seed(1)  # the same draws where there are any (patch dropout; the compiled graph draws
            first_eager = eager(batch)  # with inductor's own generator, so its kept patches differ all the same)
            torch.manual_seed(1)
            start = time.perf_counter()
            first_losses = (first_eager, compiled(batch))  # compiled: forward + backward graphs built here
            compile_s = time.perf_counter() - start
            seconds = train_step.time_interleaved([eager, compiled], batch, args.steps)
            rows.append((precision, attn, seconds[0], seconds[1], compile_s, first_losses))
            print(f"{precision} {attn}: eager {seconds[0]:.3f} s/step, compiled {seconds[1]:.3f} s/step", flush=True)
    print(f"\nmedian of {args.steps} alternating rounds after 2 warm-up steps each")
    print("| precision | attention | eager samples/s | compiled samples/s | compiled / eager | first step (incl. compile) s | first losses eager / compiled |")
    print("|---|---|---:|---:|---:|---:|---|")
    for precision, attn, eager_s, compiled_s, compile_s, (a, b) in rows:
        note = "" if precision != "bf16" or bf16_ok else " (no AVX-512 BF16/AMX: bf16 not meaningful here)"
        print(f"| {precision}{note} | {attn} | {args.batch / eager_s:.1f} | {args.batch / compiled_s:.1f} | "
              f"{eager_s / compiled_s:.2f}x | {compile_s:.0f} | {a:.5f} / {b:.5f} |")


if __name__ == "__main__":
    from mmcl.distributed import run_command

    run_command(main)  # joined a process group: exit without interpreter teardown (see run_command)
