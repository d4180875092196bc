"""`deepspeed train.py --config RUN.yaml [--deepspeed_config DS.json] [key=value ...]`.

Also runs under `torchrun` and as plain `python train.py` (one process). Installed as the
`mmcl-train` console script.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags, and every other word as a `key.sub=value` override, wherever it stands.

    Launch scripts often put overrides on both sides of a flag (`--config c.yaml train.steps=24
    --deepspeed_config ds.json train.resume=latest`), and launchers insert their own
    `--local_rank=N`; overrides keep their order. An unknown flag is a one-sentence usage error
    here; a word that is not `key=value` is one from `load_config` (a `ConfigError`).
    """
    parser = argparse.ArgumentParser(prog="train.py", description="Train a CLIP-style model with mmcl under DeepSpeed.",
                                     usage="%(prog)s --config RUN.yaml [--deepspeed_config DS.json] [key.sub=value ...]",
                                     epilog="key.sub=value overrides of run-config keys may stand anywhere among the flags.")
    parser.add_argument("--config", required=True, help="run YAML (see README.md / configs/)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="DeepSpeed JSON (configs/ds/*.json); batch sizes and precision come from the run YAML")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by launchers
    args, rest = parser.parse_known_args(argv)
    for word in rest:
        if word.startswith("-"):
            parser.error(f"unrecognized flag '{word}': train.py takes --config, --deepspeed_config and "
                         "key.sub=value overrides (written without dashes, anywhere on the line).")
    args.overrides = rest
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from mmcl.config import ConfigError, load_config

    try:  # torch-free: a config mistake is said before torch, DeepSpeed and the towers' code load (seconds)
        cfg = load_config(args.config, args.overrides)  # every config mistake surfaces here, on every rank
        from mmcl.engine.tracking import check_available

        check_available(cfg, args.config)  # log.wandb without the wandb package
    except ConfigError as error:
        from mmcl.redact import redact

        print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    from mmcl.engine.runtime import enable_stack_dumps, select_accelerator

    enable_stack_dumps()
    select_accelerator()  # before anything imports deepspeed
    from mmcl.data.loader import NoDataError
    from mmcl.data.shards import NoShardsError
    from mmcl.engine.checkpoint import ResumeError
    from mmcl.engine.ds_config import DeepSpeedConfigError, read_deepspeed_json
    from mmcl.engine.runtime import TrainingError, exit_with_error
    from mmcl.objectives.teacher import TeacherLoadError
    from mmcl.objectives.teacher_cache import StaleCacheError
    from mmcl.data.reinforced import StoreError
    from mmcl.engine.trainer import train
    from mmcl.export.errors import ExportError, PushError
    from mmcl.models import TokenizerLoadError, TowerLoadError

    user_errors = (ConfigError, NoDataError, NoShardsError, DeepSpeedConfigError, ResumeError, TrainingError, TokenizerLoadError, TowerLoadError,
                   ExportError, PushError, TeacherLoadError, StaleCacheError, StoreError)
    try:
        train(cfg, read_deepspeed_json(args.deepspeed_config), args.deepspeed_config or "DeepSpeed config")
        leave_process_group()  # after success only: on an error, peers may still sit in a collective
    except user_errors as error:
        exit_with_error(error)
    finally:
        release_shared_memory()
    return 0


def leave_process_group() -> None:
    """Tear the process group down before exit (torch warns, and NCCL may hang, without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_shared_memory() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    DeepSpeed's CPU accelerator maps a 69 MB file per rank there and never unlinks it, so
    every CPU run would leave RAM behind. Unlinking after use is safe: peers that still map
    it keep their mapping. Only the file DeepSpeed named for this user, address, port and rank
    (csrc/cpu/comm/shm.cpp), and only when this process maps it: a rank that stopped before
    DeepSpeed started must not remove the buffer of another job that uses the same port.
    """
    import os

    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))  # DeepSpeed's shm op runs on one node: the same
    if not (address and port and rank):
        return
    path = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}"
    try:
        with open("/proc/self/maps") as maps:
            if not any(line.rstrip("\n").endswith(" " + path) for line in maps):
                return
        os.unlink(path)
    except OSError:
        pass


def command() -> None:
    """The `mmcl-train` console script: `main`, ended by `run_command`."""
    from mmcl.distributed import run_command

    run_command(main)


if __name__ == "__main__":
    command()
