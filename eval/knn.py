"""Thin wrapper: `python eval/knn.py --help` (same as the installed command; see eval/README.md)."""
from mmcl.evaluation.cli import knn_command

if __name__ == "__main__":
    knn_command()
