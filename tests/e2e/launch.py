"""Shared pieces of the end-to-end tests: a tiny run config and the real launchers."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def free_port() -> int:
    """A port free right now, drawn from a range of this pytest-xdist worker's own (`make test` runs two), below
    the kernel's ephemeral ports (which gloo's connections take): two workers' launches never pick the same one."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    draw = random.Random()
    for _ in range(200):
        port = 20000 + 2000 * (worker % 6) + draw.randrange(2000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # taken, or in TIME_WAIT after an earlier launch
                continue
            return port
    raise RuntimeError(f"no free port in worker {worker}'s range")


def tiny_run_config(data: Path, output_dir: Path, **train) -> dict:
    """A run over the demo digits (16-px images) with 2-layer, 32-wide towers."""
    return {
        "model": {
            "image": {"config": dict(model_type="vit", image_size=16, patch_size=4, **ENCODER), "pooling": "cls"},
            "text": {"config": dict(model_type="bert", vocab_size=256, max_position_embeddings=16, **ENCODER),
                     "tokenizer": str(data / "tokenizer"), "context_length": 16, "pooling": "mean"},
            "embed_dim": 32,
        },
        "data": {"train_shards": str(data / "train" / "{00000..00003}.tar"), "image_size": 16,
                 "shuffle_buffer": 64, "num_workers": 1},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 16, "steps": 8, "log_every": 1, **train},
        "output_dir": str(output_dir),
        "seed": 0,
    }


# The session's reference runs (tests/e2e/conftest.py: zero_runs): ZeRO stage -> DeepSpeed JSON, steps.
ZERO_STAGES = {1: "configs/ds/zero1.json", 2: "configs/ds/zero2.json", 3: "configs/ds/zero3.json"}
ZERO_STEPS = {1: 8, 2: 16, 3: 8}  # ZeRO-2's run is longer: the interruption test needs room to stop it mid-way
# Overrides for a launch from a reference run's config that needs no end-of-run evaluation (a resume).
NO_EVAL = ("eval.zeroshot_shards=null", "eval.retrieval_shards=null")


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def env() -> dict:
    """This environment for a launched run, less any process-group variables (the launcher sets its own)."""
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**inherited, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def deepspeed_command(config: Path, ds_json: str | None = "configs/ds/zero2.json", ranks: int = 2, *overrides: str) -> list[str]:
    command = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
               str(REPO / "train.py"), "--config", str(config)]
    if ds_json:
        command += ["--deepspeed_config", str(REPO / ds_json)]
    return command + list(overrides)


def python_command(config: Path, ds_json: str | None = "configs/ds/zero2.json", *overrides: str) -> list[str]:
    """One rank as `python train.py` (DeepSpeed's engine without its launcher, as test_launchers.py
    runs it): for a one-rank run whose checks are not about the launcher, about 6-8 s sooner than
    `deepspeed --num_gpus 1`, which imports torch and DeepSpeed once more in the launcher process."""
    command = [str(BIN / "python"), str(REPO / "train.py"), "--config", str(config)]
    if ds_json:
        command += ["--deepspeed_config", str(REPO / ds_json)]
    return command + list(overrides)


def run(command: list[str], timeout: float = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launch to completion. Generous timeout: the first DeepSpeed launch of a fresh
    environment compiles its CPU comm op (~2 min). A launch that hangs fails with every rank's
    Python stacks (see `dump_stacks`) and the end of its output, and leaves no process behind."""
    process = subprocess.Popen(command, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        dump_stacks(process)
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish in {timeout:.0f} s; the end of its output, "
                             f"with each rank's stacks:\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-20000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def dump_stacks(process: subprocess.Popen, wait: float = 1.0) -> None:
    """SIGUSR1 to every training process of `process`'s session: train.py ranks (and their
    forked data workers) print all their threads' stacks to stderr (`enable_stack_dumps`).
    Launchers are spared: SIGUSR1 would just kill them."""
    for pid in session_pids(process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "train.py" in cmdline and not any(name in cmdline for name in ("deepspeed.launcher", "bin/deepspeed", "torchrun")):
            try:
                os.kill(pid, signal.SIGUSR1)
            except OSError:
                pass
            time.sleep(wait)  # one process at a time, so their stacks do not interleave


def session_pids(session_id: int) -> list[int]:
    """Processes in the session `session_id` (a process started with start_new_session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session_id:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def start(command: list[str], extra_env: dict | None = None) -> subprocess.Popen:
    """Start in a new session, so the whole tree (launcher + ranks + workers) can be signalled."""
    return subprocess.Popen(command, cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for(predicate, timeout: float = 600, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def latest_tag(output_dir: Path) -> str | None:
    path = output_dir / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def kill_tree(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(process.pid, sig)


def losses(output_dir: Path) -> dict[int, float]:
    """step -> logged loss (metrics.jsonl; one record per step with log_every 1)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def resume_copy(source_run: Path, target_run: Path, tag: str = "step_00000004") -> Path:
    """target_run as a run killed right after saving `tag`: only that checkpoint of source_run, marked latest."""
    import shutil

    (target_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / tag, target_run / "checkpoints" / tag)
    (target_run / "checkpoints" / "latest").write_text(tag)
    return target_run


def assert_resumed_run_matches(reference_run: Path, resumed_run: Path, steps: list[int], atol: float = 1e-6) -> None:
    """The resumed run logged `steps` with the reference's losses, and its final task state
    (momentum encoders, queues) equals the reference's."""
    import pytest
    import torch
    from safetensors.torch import load_file

    expected, got = losses(reference_run), losses(resumed_run)
    assert sorted(got) == steps
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
    final = f"step_{steps[-1]:08d}"
    reference = load_file(reference_run / "checkpoints" / final / "task_state.safetensors")
    continued = load_file(resumed_run / "checkpoints" / final / "task_state.safetensors")
    assert reference.keys() == continued.keys()
    for name in reference:
        assert torch.allclose(continued[name].float(), reference[name].float(), rtol=0, atol=atol), name
    assert latest_tag(resumed_run) == final
