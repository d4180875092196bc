"""Export to `transformers`, model cards, and upload to the Hugging Face Hub.

    export_run(run_or_checkpoint, out_dir) -> Path       a folder transformers loads offline
    load_exported(folder_or_repo_id) -> ExportedModel    mmcl's exact embeddings from an export
    push_export(folder, repo_id, ...) -> CommitInfo      one commit to the Hub
    push_after_training(cfg, output_dir)                 export + push for `push_to_hub` runs

Names are imported lazily, so `mmcl push` starts without importing torch.
"""
from __future__ import annotations

from mmcl.export.errors import ExportError, PushError
from mmcl.lazy import lazy_names

_LAZY = {
    "export_run": "mmcl.export.export",
    "export_model": "mmcl.export.export",
    "load_exported": "mmcl.export.hf_loader",
    "ExportedModel": "mmcl.export.hf_loader",
    "push_export": "mmcl.export.push",
    "push_after_training": "mmcl.export.push",
    "check_push_config": "mmcl.export.push",
    "check_export_dir": "mmcl.export.push",
}

__all__ = ["ExportError", "PushError", *_LAZY]

__getattr__, __dir__ = lazy_names(__name__, _LAZY)
