"""benchmarks/gpu_suite.sh in its CPU smoke mode: the script a GPU machine runs, tested here.

Eager variants only (compiling both stacks would take minutes on 2 cores; `train.compile` has
its own end-to-end test); one `deepspeed` launch with one CPU rank.
"""
from __future__ import annotations

import json
import subprocess
import sys

from launch import REPO, env


def test_gpu_suite_smoke_records_every_field_for_mmcl_and_open_clip(tmp_path):
    command = ["bash", "benchmarks/gpu_suite.sh", "--smoke", "--compile", "false", "--patch-dropout", "0",
               "--max-batch", "16"]
    result = subprocess.run(command, cwd=REPO, env={**env(), "OUT": str(tmp_path), "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu_suite.jsonl").read_text().splitlines()]
    assert [(r["stack"], r["loss"]) for r in rows] == [("mmcl", "dense"), ("mmcl", "chunked"), ("open_clip", "dense")]
    for row in rows:
        assert row["samples_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_memory_gb"] > 0
        assert row["largest_global_batch"] == 16  # 8, then 16 at the cap: no out-of-memory on the CPU
        assert row["smoke"] and row["device"] == "CPU" and row["precision"] == "fp32"
    # The same architecture on both sides: model FLOPs per step agree (the towers are nearly all of them).
    mmcl, openclip = rows[0]["gflop_per_step"], rows[2]["gflop_per_step"]
    assert 0.9 < mmcl / openclip < 1.1, (mmcl, openclip)
    assert "| mmcl | chunked | 0.0 | False |" in result.stdout
