"""Thin wrapper: `python eval/zeroshot.py --help` (same as the installed command; see eval/README.md)."""
import sys

from mmcl.evaluation.cli import zeroshot_main

if __name__ == "__main__":
    sys.exit(zeroshot_main())
