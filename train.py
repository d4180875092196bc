"""Entry point: `deepspeed train.py --config configs/demo.yaml [--deepspeed_config configs/ds/zero2.json] [key=value ...]`."""
from mmcl.distributed import run_command
from mmcl.engine.cli import main

if __name__ == "__main__":
    run_command(main)
