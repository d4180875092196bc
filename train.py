"""Entry point: `deepspeed train.py --config configs/demo.yaml [--deepspeed_config configs/ds/zero2.json] [key=value ...]`."""
from mmcl.engine.cli import command

if __name__ == "__main__":
    command()
