"""Thin wrapper: `python eval/retrieval.py --help` (same as the installed command; see eval/README.md)."""
from mmcl.evaluation.cli import retrieval_command

if __name__ == "__main__":
    retrieval_command()
