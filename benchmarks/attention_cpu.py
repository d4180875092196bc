"""Attention kernels on the CPU: torch's SDPA vs transformers' eager (matmul) attention, forward + backward.

The measurement behind `mmcl.engine.attention`: which kernel a tower whose config leaves
`attn_implementation` unset runs on the CPU. The shapes are the towers of the benchmarks
(65 tokens: the 64-px tiny CLIP of train_step.py; 129 and 257: patch_dropout.py's 128-px ViT
with and without patch dropout 0.5; 32: their captions). Each kernel is timed in alternation
with the other (median of the rounds); both compute the same attention (the largest
difference of their outputs is printed).

    python benchmarks/attention_cpu.py [--rounds 7] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from compile_step import cpu_report
from train_step import time_interleaved

# (batch, heads, tokens, head width)
SHAPES = [(128, 4, 65, 64), (32, 6, 129, 64), (32, 12, 197, 64), (32, 6, 257, 64), (8, 12, 577, 64), (32, 4, 32, 64), (32, 8, 77, 64)]


def eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """transformers' `eager_attention_forward` without mask or dropout: softmax in float32, then back."""
    weights = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(torch.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def forward_backward_seconds(kernels, shape, dtype, rounds: int) -> list[float]:
    """Median seconds of one forward + backward of each kernel on the same q, k, v, in alternation."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype)
    steps = [lambda _, kernel=kernel: kernel(q, k, v).backward(grad) for kernel in kernels]
    return time_interleaved(steps, None, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu, bf16_ok = cpu_report()
    print(cpu)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.rounds} alternating rounds")
    print("| dtype | batch, heads, tokens, head width | SDPA fwd+bwd ms | eager fwd+bwd ms | SDPA / eager | max output diff |")
    print("|---|---|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for shape in SHAPES:
            sdpa_s, eager_s = forward_backward_seconds([sdpa, eager], shape, dtype, args.rounds)
            q, k, v = (torch.randn(*shape, dtype=dtype) for _ in range(3))
            diff = (sdpa(q, k, v).float() - eager(q, k, v).float()).abs().max().item()
            name = "bf16" if dtype == torch.bfloat16 else "fp32"
            note = "" if name == "fp32" or bf16_ok else " (no AVX-512 BF16/AMX: not meaningful)"
            print(f"| {name}{note} | {', '.join(map(str, shape))} | {sdpa_s * 1e3:.1f} | {eager_s * 1e3:.1f} "
                  f"| {sdpa_s / eager_s:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
