"""Thin wrapper: `python eval/linear_probe.py --help` (same as the installed command; see eval/README.md)."""
import sys

from mmcl.evaluation.cli import linear_probe_main

if __name__ == "__main__":
    sys.exit(linear_probe_main())
