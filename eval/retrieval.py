"""Thin wrapper: `python eval/retrieval.py --help` (same as the installed command; see eval/README.md)."""
import sys

from mmcl.evaluation.cli import retrieval_main

if __name__ == "__main__":
    sys.exit(retrieval_main())
