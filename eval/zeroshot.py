"""Thin wrapper: `python eval/zeroshot.py --help` (same as the installed command; see eval/README.md)."""
from mmcl.evaluation.cli import zeroshot_command

if __name__ == "__main__":
    zeroshot_command()
