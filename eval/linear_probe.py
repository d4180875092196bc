"""Thin wrapper: `python eval/linear_probe.py --help` (same as the installed command; see eval/README.md)."""
from mmcl.evaluation.cli import linear_probe_command

if __name__ == "__main__":
    linear_probe_command()
