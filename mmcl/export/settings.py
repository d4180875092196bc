"""The `push_to_hub` section of a run config. Imports neither torch nor transformers."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PushConfig:
    """Upload the exported model to the Hugging Face Hub at the end of training (rank 0)."""

    repo_id: str  # "org/name"
    private: bool = False  # create the repo private
    revision: str | None = None  # branch; None = main
    commit_message: str | None = None  # default: one naming the run
    allow_inexact: bool = False  # push even when plain transformers cannot reproduce a side (see `mmcl push --allow-inexact`)
