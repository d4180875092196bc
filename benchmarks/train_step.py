"""Training-step throughput: mmcl (DeepSpeed engine, ZeRO-1, one process) vs OpenCLIP's step.

Both sides train the same architecture on the same synthetic batch with torch AdamW:
- OpenCLIP: `open_clip.model.CLIP` + `ClipLoss` + AdamW, as `open_clip_train` steps it
  (autocast for bf16, as its `--precision amp_bf16`).
- mmcl: a DualEncoder of `transformers` CLIP towers (clip_vision_model + clip_text_model) of
  the same widths, depths, heads, patch size and context length, pooled like OpenCLIP
  (vision: post-LN class token; text: end-of-text token), linear projections without bias,
  trained through `TrainingTask` under a DeepSpeed ZeRO-1 engine (DeepSpeed's own bf16
  mode for bf16).

The table also shows the achieved FLOP/s of each step (FLOPs counted once with
torch.utils.flop_counter on forward + backward) over this machine's dense matmul FLOP/s,
measured here on a 2048^3 matmul in the same dtype: the fraction of peak.

    python benchmarks/train_step.py [--batch 128] [--steps 8] [--precision fp32 bf16] [--attn sdpa eager]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# The tiny CLIP of DESIGN.md's measurements: 6.8 M parameters.
WIDTH, LAYERS, HEADS, PATCH, IMAGE, CONTEXT, VOCAB, EMBED = 256, 4, 4, 8, 64, 32, 4096, 256


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def synthetic_batch(batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB - 1, (batch, CONTEXT), generator=generator)
    lengths = torch.randint(4, CONTEXT, (batch,), generator=generator)
    attention_mask = (torch.arange(CONTEXT)[None, :] < lengths[:, None]).long()
    input_ids[torch.arange(batch), lengths - 1] = VOCAB - 1  # end-of-text = the largest id (argmax pooling)
    input_ids = input_ids * attention_mask
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),
            "input_ids": input_ids, "attention_mask": attention_mask}


def openclip_step_fn(precision: str):
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.model.CLIP(
        EMBED,
        open_clip.model.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE),
        open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS),
    )
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def forward_backward(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            image, text, scale = model(batch["pixel_values"], batch["input_ids"])
            loss = loss_fn(image, text, scale)
        loss.backward()
        return loss

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(batch)
        optimizer.step()

    return model, step, count_flops(forward_backward, synthetic_batch(BATCH_FOR_FLOPS[0]))


def mmcl_step_fn(precision: str, attn: str):
    import deepspeed

    from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig
    from mmcl.engine.runtime import init_process_group
    from mmcl.engine.steps import plain_step
    from mmcl.engine.task import TrainingTask
    from mmcl.models import build_model

    common = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=4 * WIDTH,
                  hidden_act="gelu", attention_dropout=0.0)
    config = ModelConfig(
        image=TowerConfig(config=dict(model_type="clip_vision_model", image_size=IMAGE, patch_size=PATCH, **common),
                          pooling="pooler_output", attn_implementation=attn),
        text=TextTowerConfig(config=dict(model_type="clip_text_model", vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                                         eos_token_id=VOCAB - 1, **common),
                             tokenizer="unused", context_length=CONTEXT, pooling="eos", attn_implementation=attn),
        embed_dim=EMBED,
    )
    init_process_group()
    task = TrainingTask(build_model(config), {"clip": 1.0})
    flops = count_flops(lambda batch: task(batch)["loss"].backward(), synthetic_batch(BATCH_FOR_FLOPS[0]))
    task.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
                 "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def cast(batch):
        return {**batch, "pixel_values": batch["pixel_values"].to(dtype)}

    def step(batch):
        plain_step(engine, [cast(batch)])

    return task.model, step, flops


BATCH_FOR_FLOPS = [128]


def count_flops(forward_backward, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        forward_backward(batch)
    return counter.get_total_flops()


def time_interleaved(steps: list, batch, rounds: int) -> list[float]:
    """Median seconds per step of each step function, measured in alternation.

    Alternating (a, b, c, a, b, c, ...) exposes every contender to the same background load,
    so the ratios hold even on a shared machine where absolute figures drift.
    """
    for step in steps:  # warm-up
        step(batch)
        step(batch)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(rounds):
        for index, step in enumerate(steps):
            start = time.perf_counter()
            step(batch)
            times[index].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"], help="attention implementations of the mmcl towers")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = synthetic_batch(args.batch)
    BATCH_FOR_FLOPS[0] = args.batch
    rows = []
    for precision in args.precision:
        peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        print(f"{precision}: dense matmul peak {peak / 1e9:.0f} GFLOP/s")
        contenders = [("open_clip", "-", *openclip_step_fn(precision))]
        contenders += [("mmcl", attn, *mmcl_step_fn(precision, attn)) for attn in args.attn]
        seconds = time_interleaved([c[3] for c in contenders], batch, args.steps)
        reference = args.batch / seconds[0]
        for (name, attn, model, _, flops), taken in zip(contenders, seconds):
            params = sum(p.numel() for p in model.parameters())
            rate = args.batch / taken
            rows.append((name, precision, attn, params, flops, rate, flops / taken / peak, rate / reference))
    print(f"\nbatch {args.batch}, {args.threads} threads, median of {args.steps} alternating rounds")
    print("| stack | precision | attention | params | GFLOP/step | samples/s | fraction of matmul peak | ratio vs open_clip |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, precision, attn, params, flops, rate, fraction, ratio in rows:
        print(f"| {name} | {precision} | {attn} | {params / 1e6:.2f} M | {flops / 1e9:.1f} | {rate:.1f} | {fraction:.0%} | {ratio:.2f}x |")


if __name__ == "__main__":
    from mmcl.distributed import run_command

    run_command(main)  # joined a process group: exit without interpreter teardown (see run_command)
