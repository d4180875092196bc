"""Memory of one fine-tuning step at full size: full fine-tune vs LoRA, under DeepSpeed ZeRO-2.

    python benchmarks/finetune_memory.py                       # both variants, batch 8, 1 rank
    python benchmarks/finetune_memory.py --batch 32 --ranks 2  # on a machine with room for it

The model is CLIP ViT-B/16's shape, random init from inline configs (no download): a
`clip_vision_model` tower (224 px, patch 16, width 768, 12 layers) and a 12-layer
`clip_text_model` tower (width 512, 77 tokens), linear heads to 512. Each variant runs in its
own `deepspeed` launch (`--worker`), so its peak is its own, and takes one optimizer step of the
CLIP loss on random pixels and tokens with mmcl's parameter groups and AdamW under ZeRO-2:

- full: every parameter trains;
- lora: `model.image.lora` and `model.text.lora` at rank 16 (alpha 32, the default q/v targets);
  only the adapters, projections and logit scale train.

Reported per variant: trainable parameters; optimizer-state bytes (everything DeepSpeed's ZeRO-2
optimizer holds for them on this rank: the fp32 master partition and AdamW's two moments);
peak memory: the process's peak RSS (CPU) and, on a GPU, `torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = dict(model_type="clip_vision_model", image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
             num_attention_heads=12, intermediate_size=3072)
TEXT = dict(model_type="clip_text_model", vocab_size=49408, max_position_embeddings=77, hidden_size=512,
            num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048)
VARIANTS = ("full", "lora")
GIB = 2**30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(variant: str, batch: int, rank_out: Path) -> None:
    """One step of `variant` under ZeRO-2 in this (launched) process; rank 0 writes its figures to `rank_out`."""
    import deepspeed
    import torch
    import torch.nn.functional as F

    from mmcl.engine.optim import build_optimizer
    from mmcl.engine.settings import OptimConfig
    from mmcl.models import build_model
    from mmcl.models.settings import LoraConfig, ModelConfig, TextTowerConfig, TowerConfig

    lora = LoraConfig(rank=16, alpha=32.0) if variant == "lora" else None
    config = ModelConfig(image=TowerConfig(config=dict(IMAGE), pooling="pooler_output", lora=lora),
                         text=TextTowerConfig(config=dict(TEXT), tokenizer="unused", context_length=77, lora=lora),
                         embed_dim=512)
    torch.manual_seed(0)
    model = build_model(config)

    class Step(torch.nn.Module):
        """The CLIP loss of one batch inside the engine's forward."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, input_ids, attention_mask):
            out = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
            logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
            labels = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    task = Step(model)
    optimizer = build_optimizer(task, OptimConfig(lr=1e-5), prefix="model.")
    ds_config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=ds_config)
    device = engine.device
    pixels = torch.randn(batch, 3, 224, 224, device=device)
    ids = torch.randint(0, 49407, (batch, 77), device=device)
    ids[:, -1] = 49407
    mask = torch.ones_like(ids)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    loss = engine(pixels, ids, mask)
    engine.backward(loss)
    engine.step()
    seconds = time.perf_counter() - started

    inner = engine.optimizer  # DeepSpeedZeroOptimizer: fp32 master partitions + the wrapped AdamW's moments
    master = sum(t.numel() * t.element_size() for t in getattr(inner, "single_partition_of_fp32_groups", []))
    moments = sum(t.numel() * t.element_size() for state in inner.optimizer.state.values()
                  for key, t in state.items() if torch.is_tensor(t) and key != "step")
    if int(os.environ.get("RANK", "0")) == 0:
        rank_out.write_text(json.dumps({
            "variant": variant, "batch_per_rank": batch, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "device": str(device), "loss": float(loss),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer_state_bytes": master + moments, "adam_moment_bytes": moments, "fp32_master_bytes": master,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "peak_cuda_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
            "step_seconds": seconds,
        }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="micro batch per rank")
    parser.add_argument("--ranks", type=int, default=1, help="deepspeed --num_gpus")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.out)
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for variant in args.variants:
            out = Path(folder) / f"{variant}.json"
            command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
                       str(_free_port()), str(Path(__file__).resolve()), "--worker", variant, "--batch", str(args.batch),
                       "--out", str(out)]
            env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0 or not out.is_file():
                sys.exit(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results.append(json.loads(out.read_text()))
    print("| variant | trainable params | optimizer state (MiB) | Adam moments (MiB) | peak RSS (GiB) | peak GPU (GiB) | step (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        gpu = "-" if r["peak_cuda_gib"] is None else f"{r['peak_cuda_gib']:.2f}"
        print(f"| {r['variant']} | {r['trainable_parameters']:,} / {r['parameters']:,} | "
              f"{r['optimizer_state_bytes'] / 2**20:.1f} | {r['adam_moment_bytes'] / 2**20:.1f} | "
              f"{r['peak_rss_gib']:.2f} | {gpu} | {r['step_seconds']:.1f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
