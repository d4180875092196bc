"""Patch dropout (FLIP) throughput: mmcl with `model.image.patch_dropout` 0.5 vs 0, and vs OpenCLIP's
`patch_dropout` at the same rate, on one CLIP whose image tower dominates the step.

Same setup as `train_step.py` (whose timing helpers it uses): one process, torch AdamW, the same
synthetic batch for every contender; OpenCLIP as `open_clip_train` steps it (`open_clip.model.CLIP`
with `CLIPVisionCfg(patch_dropout=p)`, `ClipLoss`, autocast for bf16); mmcl's DualEncoder of
`transformers` CLIP towers of the same widths, depths, heads, patch size and context length
under a DeepSpeed ZeRO-1 engine (DeepSpeed's bf16 mode for bf16), with each attention
implementation asked for. Every contender is timed in alternation with the others of its
precision, so the ratios hold on a shared machine.

    python benchmarks/patch_dropout.py [--batch 32] [--steps 8] [--precision fp32 bf16] [--attn auto sdpa eager]
"""
from __future__ import annotations

import argparse
import os
import platform

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from train_step import count_flops, matmul_peak, time_interleaved  # noqa: E402

# Image tower: 128-px images, 8-px patches (256 patch tokens), 384 wide, 6 layers: about 85% of
# the step's FLOPs. Text tower: 32 tokens, 256 wide, 4 layers.
IMAGE, PATCH, IMAGE_WIDTH, IMAGE_LAYERS, IMAGE_HEADS = 128, 8, 384, 6, 6
CONTEXT, VOCAB, TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, EMBED = 32, 4096, 256, 4, 4, 256


def cpu_report() -> tuple[str, bool]:
    """(a line naming the CPU and its bf16 support, whether bf16 matmuls have hardware support)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    avx512_bf16, amx = "avx512_bf16" in flags, "amx_bf16" in flags
    return (f"CPU: {model}, {os.cpu_count()} cores; AVX-512 BF16: {'yes' if avx512_bf16 else 'no'}; "
            f"AMX-BF16: {'yes' if amx else 'no'}"), avx512_bf16 or amx


def synthetic_batch(batch: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, VOCAB - 1, (batch, CONTEXT), generator=generator)
    lengths = torch.randint(4, CONTEXT, (batch,), generator=generator)
    attention_mask = (torch.arange(CONTEXT)[None, :] < lengths[:, None]).long()
    input_ids[torch.arange(batch), lengths - 1] = VOCAB - 1  # end-of-text = the largest id (argmax pooling)
    return {"pixel_values": torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),
            "input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def openclip_step_fn(precision: str, patch_dropout: float, batch: dict):
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        EMBED,
        open_clip.model.CLIPVisionCfg(layers=IMAGE_LAYERS, width=IMAGE_WIDTH, head_width=IMAGE_WIDTH // IMAGE_HEADS,
                                      patch_size=PATCH, image_size=IMAGE, patch_dropout=patch_dropout),
        open_clip.model.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=TEXT_WIDTH, heads=TEXT_HEADS,
                                    layers=TEXT_LAYERS),
    )
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def forward_backward(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            image, text, scale = model(batch["pixel_values"], batch["input_ids"])
            loss = loss_fn(image, text, scale)
        loss.backward()

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(batch)
        optimizer.step()

    return step, count_flops(forward_backward, batch)


def mmcl_step_fn(precision: str, attn: str, patch_dropout: float, batch: dict, compiled: bool = False):
    """(step(batch), FLOPs of one forward + backward); `compiled`: the towers compiled as `train.compile` does."""
    import deepspeed

    from mmcl.config import ModelConfig, OptimConfig, TextTowerConfig, TowerConfig
    from mmcl.engine.attention import choose_attention
    from mmcl.engine.compile import compile_towers
    from mmcl.engine.optim import build_optimizer
    from mmcl.engine.runtime import init_process_group
    from mmcl.engine.steps import plain_step
    from mmcl.engine.task import TrainingTask
    from mmcl.models import build_model

    common = dict(hidden_act="gelu", attention_dropout=0.0)
    config = ModelConfig(
        image=TowerConfig(config=dict(model_type="clip_vision_model", image_size=IMAGE, patch_size=PATCH,
                                      hidden_size=IMAGE_WIDTH, num_hidden_layers=IMAGE_LAYERS,
                                      num_attention_heads=IMAGE_HEADS, intermediate_size=4 * IMAGE_WIDTH, **common),
                          pooling="pooler_output", attn_implementation=None if attn == "auto" else attn,
                          patch_dropout=patch_dropout),
        text=TextTowerConfig(config=dict(model_type="clip_text_model", vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                                         eos_token_id=VOCAB - 1, hidden_size=TEXT_WIDTH, num_hidden_layers=TEXT_LAYERS,
                                         num_attention_heads=TEXT_HEADS, intermediate_size=4 * TEXT_WIDTH, **common),
                             tokenizer="unused", context_length=CONTEXT, pooling="eos",
                             attn_implementation=None if attn == "auto" else attn),
        embed_dim=EMBED,
    )
    init_process_group()
    torch.manual_seed(0)
    model = build_model(config)
    if attn == "auto":  # the trainer's own choice (mmcl.engine.attention), as set_up makes it
        picked = choose_attention(model, config, bf16=precision == "bf16")
        print(f"mmcl auto attention, {precision}, patch_dropout {patch_dropout}: eager for {picked or 'no tower'}")
    task = TrainingTask(model, {"clip": 1.0})
    flops = count_flops(lambda b: task(b)["loss"].backward(), batch)
    task.zero_grad(set_to_none=True)
    optimizer = build_optimizer(task, OptimConfig(lr=1e-4), prefix="model.")  # as the trainer builds it
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1},
                 "bf16": {"enabled": precision == "bf16"}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    if compiled:
        compile_towers(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def step(batch):
        metrics, _ = plain_step(engine, [{**batch, "pixel_values": batch["pixel_values"].to(dtype)}])
        return float(metrics["loss"]) if metrics is not None else float("nan")

    return step, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="alternating timing rounds (median reported)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--attn", nargs="+", default=["auto", "sdpa", "eager"],
                        help="attention implementations of the mmcl towers; auto: unset, as the trainer picks it")
    parser.add_argument("--patch-dropout", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu, bf16_hardware = cpu_report()
    print(cpu)
    if "bf16" in args.precision and not bf16_hardware:
        print("bf16 figures are NOT meaningful on this CPU: no AVX-512 BF16 or AMX, bf16 matmuls are emulated")
    batch = synthetic_batch(args.batch)
    rows = []
    for precision in args.precision:
        peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        print(f"{precision}: dense matmul peak {peak / 1e9:.0f} GFLOP/s")
        contenders = []
        for p in (0.0, args.patch_dropout):
            contenders.append(("open_clip", "-", p, *openclip_step_fn(precision, p, batch)))
            contenders += [("mmcl", attn, p, *mmcl_step_fn(precision, attn, p, batch)) for attn in args.attn]
        seconds = time_interleaved([c[3] for c in contenders], batch, args.steps)
        rates = {(name, attn, p): args.batch / taken for (name, attn, p, _, _), taken in zip(contenders, seconds)}
        for (name, attn, p, _, flops), taken in zip(contenders, seconds):
            rate = rates[(name, attn, p)]
            rows.append((name, precision, attn, p, flops, rate, flops / taken / peak,
                         rate / rates[(name, attn, 0.0)], rate / rates[("open_clip", "-", p)]))
    print(f"\nbatch {args.batch}, {args.threads} threads, median of {args.steps} alternating rounds per precision"
          + ("" if bf16_hardware else "; bf16 rows not meaningful on this CPU"))
    print("| stack | precision | attention | patch_dropout | GFLOP/step | samples/s | fraction of matmul peak "
          "| vs same stack at p=0 | vs open_clip at same p |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, precision, attn, p, flops, rate, fraction, speedup, ratio in rows:
        print(f"| {name} | {precision} | {attn} | {p:g} | {flops / 1e9:.1f} | {rate:.1f} | {fraction:.0%} "
              f"| {speedup:.2f}x | {ratio:.2f}x |")


if __name__ == "__main__":
    from mmcl.distributed import run_command

    run_command(main)  # joined a process group: exit without interpreter teardown (see run_command)
