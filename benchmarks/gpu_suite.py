"""The GPU suite's worker: CLIP ViT-B/16 + a 12-layer 512-wide text tower, mmcl under DeepSpeed vs OpenCLIP.

Run it through `benchmarks/gpu_suite.sh`, which starts it under the `deepspeed` launcher. For
each variant — loss dense or chunked, patch dropout 0 or 0.5, eager or `torch.compile` — it
measures, on synthetic batches already on the device (the data pipeline is benchmarked
elsewhere):

- samples/s: median step time of `--steps` timed steps after warm-up;
- MFU: model FLOPs of one step (forward + backward, counted once with
  torch.utils.flop_counter on the eager model) / step time / the GPU's peak bf16 dense
  FLOP/s (a table of known GPUs, else a measured matmul);
- peak memory: torch.cuda.max_memory_allocated over the timed steps (CPU: peak RSS);
- the largest global batch that trains one step, found by doubling from `--batch` until an
  out-of-memory error (up to `--max-batch`).

OpenCLIP's same model (open_clip.model.CLIP with the same widths, depths, heads, patch,
context; its own `patch_dropout`; ClipLoss; autocast bf16, as `open_clip_train
--precision amp_bf16`) is measured in the same process, alternating is not possible across
engines, so its rows come right after mmcl's, on the same GPU, in the same run.

`--smoke`: tiny sizes, few steps, on whatever device there is (the CPU here), so the
script itself is tested without a GPU. Results are appended as JSON lines to `--out`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # mmcl from this checkout

FULL = dict(image=224, patch=16, vision_width=768, vision_layers=12, vision_heads=12, text_width=512, text_layers=12,
            text_heads=8, context=77, vocab=49408, embed=512)
SMOKE = dict(image=32, patch=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=2,
             text_heads=2, context=16, vocab=256, embed=32)
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def device() -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_BF16.items():
            if key in name and dtype == torch.bfloat16:
                return value, f"{name} datasheet bf16 dense"
    size = 4096 if torch.cuda.is_available() else 1024
    dev = device()
    a, b = torch.randn(size, size, dtype=dtype, device=dev), torch.randn(size, size, dtype=dtype, device=dev)
    times = []
    for _ in range(5):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times), f"measured {size}^3 matmul"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    from mmcl.engine.step_timer import reset_peak_memory

    reset_peak_memory(torch.cuda.is_available())


def peak_gb() -> float:
    from mmcl.engine.step_timer import peak_memory_bytes

    return peak_memory_bytes(torch.cuda.is_available()) / 2**30


def synthetic_batch(dims: dict, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab, context = dims["vocab"], dims["context"]
    lengths = torch.randint(4, context, (batch,), generator=generator)
    mask = (torch.arange(context)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab - 1, (batch, context), generator=generator)
    ids[torch.arange(batch), lengths - 1] = vocab - 1  # end of text = the largest id (argmax pooling, as CLIP)
    dev = device()
    return {"pixel_values": torch.randn(batch, 3, dims["image"], dims["image"], generator=generator).to(dev, dtype),
            "input_ids": (ids * mask).to(dev), "attention_mask": mask.to(dev)}


# ----------------------------------------------------------------------------- contenders


def mmcl_config(dims: dict, patch_dropout: float):
    from mmcl.config import ModelConfig, TextTowerConfig, TowerConfig

    vision = dict(model_type="clip_vision_model", image_size=dims["image"], patch_size=dims["patch"],
                  hidden_size=dims["vision_width"], num_hidden_layers=dims["vision_layers"],
                  num_attention_heads=dims["vision_heads"], intermediate_size=4 * dims["vision_width"], hidden_act="gelu")
    text = dict(model_type="clip_text_model", vocab_size=dims["vocab"], max_position_embeddings=dims["context"],
                eos_token_id=dims["vocab"] - 1, hidden_size=dims["text_width"], num_hidden_layers=dims["text_layers"],
                num_attention_heads=dims["text_heads"], intermediate_size=4 * dims["text_width"], hidden_act="gelu")
    # `patch_dropout` is a TowerConfig key from issue 15's patch-dropout branch; without it this variant is skipped.
    extra = {"patch_dropout": patch_dropout} if patch_dropout else {}
    image = TowerConfig(config=vision, pooling="pooler_output", **extra)
    return ModelConfig(image=image, text=TextTowerConfig(config=text, tokenizer="unused", context_length=dims["context"],
                                                         pooling="eos"), embed_dim=dims["embed"])


def mmcl_contender(dims: dict, variant: dict, precision: str):
    """(step(batch), flops_of(batch), cleanup()) for mmcl's DualEncoder under a DeepSpeed ZeRO-1 engine."""
    import deepspeed

    from mmcl.config import OptimConfig
    from mmcl.engine.compile import compile_towers
    from mmcl.engine.optim import build_optimizer
    from mmcl.engine.steps import plain_step
    from mmcl.engine.task import TrainingTask
    from mmcl.models import build_model

    torch.manual_seed(0)
    chunk = None if variant["loss"] == "dense" else variant.get("chunk_size", 4096)
    task = TrainingTask(build_model(mmcl_config(dims, variant["patch_dropout"])), {"clip": 1.0}, chunk)
    flops_model = task

    def flops_of(batch):
        with FlopCounterMode(display=False) as counter:
            flops_model(batch)["loss"].backward()
        task.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    optimizer = build_optimizer(task, OptimConfig(lr=1e-4), prefix="model.")  # as the trainer builds it
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 1}, "bf16": {"enabled": precision == "bf16"},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    flops_model = engine  # the engine's module on its device and dtype
    compiled = []

    def step(batch):
        if variant["compile"] and not compiled:
            compiled.extend(compile_towers(task.model))
        plain_step(engine, [batch])

    def cleanup():
        engine.destroy() if hasattr(engine, "destroy") else None

    return step, flops_of, cleanup


def openclip_contender(dims: dict, variant: dict, precision: str):
    """OpenCLIP's CLIP + ClipLoss + AdamW, stepped as open_clip_train does (autocast for bf16)."""
    import open_clip
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    vision = open_clip.model.CLIPVisionCfg(layers=dims["vision_layers"], width=dims["vision_width"],
                                           head_width=dims["vision_width"] // dims["vision_heads"], patch_size=dims["patch"],
                                           image_size=dims["image"], patch_dropout=variant["patch_dropout"])
    text = open_clip.model.CLIPTextCfg(context_length=dims["context"], vocab_size=dims["vocab"], width=dims["text_width"],
                                       heads=dims["text_heads"], layers=dims["text_layers"])
    model = open_clip.model.CLIP(dims["embed"], vision, text).to(device()).train()
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if variant["compile"] else model

    def forward_backward(batch, net=forward):
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            image, text_features, scale = net(batch["pixel_values"], batch["input_ids"])
            loss = loss_fn(image, text_features, scale)
        loss.backward()

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        forward_backward(batch)
        optimizer.step()

    def flops_of(batch):
        with FlopCounterMode(display=False) as counter:
            forward_backward(batch, net=model)
        optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return step, flops_of, lambda: None


# ----------------------------------------------------------------------------- measuring


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(build, dims: dict, variant: dict, args, dtype: torch.dtype, peak: float) -> dict:
    step, flops_of, cleanup = build(dims, variant, args.precision)
    pixel_dtype = dtype if variant["stack"] == "mmcl" else torch.float32  # OpenCLIP autocasts from fp32
    batch = synthetic_batch(dims, args.batch, pixel_dtype)
    flops = flops_of(batch)
    start = time.perf_counter()
    step(batch)  # warm-up; compiles the compiled variants
    sync()
    first_step_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        step(batch)
    reset_peak()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step(batch)
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    row = {**variant, "precision": args.precision, "batch_per_rank": args.batch, "world": world,
           "samples_per_s": args.batch * world / seconds, "step_s": seconds, "first_step_s": first_step_s,
           "gflop_per_step": flops / 1e9, "mfu": flops / seconds / peak, "peak_memory_gb": peak_gb()}
    row["largest_global_batch"] = largest_batch(step, dims, pixel_dtype, args) * world if args.max_batch else None
    cleanup()
    return row


def largest_batch(step, dims: dict, dtype: torch.dtype, args) -> int | str:
    """The largest per-rank batch (doubling from --batch) that trains one step; '>= N' at the cap."""
    good, size = args.batch, args.batch * 2
    while size <= args.max_batch:
        try:
            step(synthetic_batch(dims, size, dtype))
            sync()
            good, size = size, size * 2
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            if not is_oom(error):
                raise
            break
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return good


def variants(args) -> list[dict]:
    rows = []
    for stack in args.stacks:
        for patch_dropout in args.patch_dropout:
            for compiled in args.compile:
                losses = args.losses if stack == "mmcl" else ["dense"]
                rows += [{"stack": stack, "loss": loss, "patch_dropout": patch_dropout, "compile": compiled}
                         for loss in losses]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps: tests the script on a CPU")
    parser.add_argument("--batch", type=int, default=None, help="per-rank batch (default 256; smoke 8)")
    parser.add_argument("--max-batch", type=int, default=None, help="cap of the largest-batch search (0 = skip it)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--stacks", nargs="+", default=["mmcl", "open_clip"])
    parser.add_argument("--losses", nargs="+", default=["dense", "chunked"])
    parser.add_argument("--patch-dropout", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument("--compile", nargs="+", type=lambda v: v.lower() in ("1", "true", "yes"), default=[False, True])
    parser.add_argument("--out", default="gpu_suite.jsonl")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    args = parser.parse_args()
    smoke = args.smoke
    dims = SMOKE if smoke else FULL
    args.batch = args.batch or (8 if smoke else 256)
    args.steps = args.steps or (2 if smoke else 10)
    args.max_batch = (32 if smoke else 65536) if args.max_batch is None else args.max_batch
    args.precision = args.precision or ("fp32" if smoke else "bf16")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    from mmcl.engine.runtime import init_process_group

    init_process_group()
    rank = int(os.environ.get("RANK", "0"))
    peak, peak_source = peak_flops(dtype)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if rank == 0:
        print(f"[gpu_suite] {where}; peak {peak / 1e12:.3f} TFLOP/s ({peak_source}); torch {torch.__version__}; "
              f"{'smoke' if smoke else 'full'} sizes {dims}", flush=True)
    rows = []
    for variant in variants(args):
        build = mmcl_contender if variant["stack"] == "mmcl" else openclip_contender
        try:
            row = measure(build, dims, variant, args, dtype, peak)
        except TypeError as error:  # TowerConfig without patch_dropout: the patch-dropout branch is not merged
            if "patch_dropout" not in str(error):
                raise
            row = {**variant, "skipped": "model.image.patch_dropout is not available in this checkout"}
        row.update(device=where, peak_flops=peak, peak_source=peak_source, smoke=smoke)
        rows.append(row)
        if rank == 0:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            print(f"[gpu_suite] {json.dumps(row)}", flush=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if rank == 0:
        print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| stack | loss | patch dropout | compile | samples/s | MFU | peak memory GB | largest global batch | first step s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['stack']} | {r['loss']} | {r['patch_dropout']} | {r['compile']} | skipped: {r['skipped']} | | | | |")
            continue
        lines.append(f"| {r['stack']} | {r['loss']} | {r['patch_dropout']} | {r['compile']} | {r['samples_per_s']:.1f} | "
                     f"{r['mfu']:.1%} | {r['peak_memory_gb']:.2f} | {r['largest_global_batch']} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from mmcl.distributed import run_command

    run_command(main)  # joined a process group: exit without interpreter teardown (see run_command)
