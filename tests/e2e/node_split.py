"""Run by `torchrun --nnodes 2 --nproc_per_node 1 --node_rank {0,1}` (two agents on loopback):
each node's rank reads one epoch of the training stream and writes the sample keys it got.

argv: shard pattern, output folder. Uses the trainer's own process-group setup.
"""
import json
import sys
from pathlib import Path

from mmcl.config import DataConfig
from mmcl.data.loader import build_train_loader
from mmcl.distributed import get_rank, get_world_size, run_command
from mmcl.engine.runtime import init_process_group, select_accelerator


def main() -> None:
    pattern, out = sys.argv[1], Path(sys.argv[2])
    select_accelerator()
    init_process_group()
    data = DataConfig(train_shards=pattern, image_size=16, num_workers=2, shuffle_buffer=16)
    loader = build_train_loader(data, None, batch_size=8, seed=0, exhaust=True)
    keys = [key for batch in loader for key in batch["keys"]]
    (out / f"rank{get_rank()}.json").write_text(json.dumps({"world_size": get_world_size(), "keys": keys}))


if __name__ == "__main__":
    run_command(main)
