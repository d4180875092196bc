"""Thin wrapper: `python eval/knn.py --help` (same as the installed command; see eval/README.md)."""
import sys

from mmcl.evaluation.cli import knn_main

if __name__ == "__main__":
    sys.exit(knn_main())
