"""A checkpoint's manifest: the size and SHA-256 of every file written for it.

`save_checkpoint` writes `mmcl_manifest.json` into a checkpoint folder after every rank has
finished writing and before `latest` moves to it (each rank hashes every world_size-th file,
rank 0 writes the result). The manifest tells

- resume and export whether a checkpoint is intact: a flipped bit or a copy that stopped halfway
  changes a file's size or digest (`damage`), and resume falls back to the previous intact one;
- pruning which folders mmcl wrote: only folders with a manifest are ever deleted.

Like DeepSpeed's own `latest`, this assumes a checkpoint folder every rank sees.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "mmcl_manifest.json"
FORMAT = "mmcl checkpoint manifest 1"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Paths (relative, sorted) of the checkpoint's files; hidden temporaries and the manifest excluded."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def write_manifest(folder: Path, step: int) -> None:
    """Hash `folder`'s files (shared over the ranks) and write its manifest (rank 0). Called by every rank."""
    from mmcl.distributed import get_rank, get_world_size

    rank, world_size = get_rank(), get_world_size()
    names = _files(folder)
    mine = {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
            for name in names[rank::world_size]}
    if world_size > 1 and dist.is_initialized():
        shares: list[Any] = [None] * world_size
        dist.all_gather_object(shares, mine)
    else:
        shares = [mine]
    if rank == 0:
        files = {name: entry for share in shares for name, entry in share.items()}
        temporary = folder / f".{MANIFEST}.tmp"
        temporary.write_text(json.dumps({"format": FORMAT, "step": step, "files": dict(sorted(files.items()))}, indent=1))
        os.replace(temporary, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of `folder`, or None when it has none (or one mmcl did not write)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def has_manifest(folder: Path) -> bool:
    """True for a checkpoint folder mmcl wrote completely (its manifest is the last file written)."""
    return folder.is_dir() and read_manifest(folder) is not None


def damage(folder: Path) -> str | None:
    """What in `folder` differs from its manifest, in words ('<file> is missing', '... has N bytes
    instead of M', '... does not match its SHA-256'); None when every file matches. Sizes are checked
    for every file before any file is hashed."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"its {MANIFEST} is missing or unreadable"
    files = manifest["files"]
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes instead of {entry['size']}"
    for name, entry in files.items():
        if sha256_file(folder / name) != entry["sha256"]:
            return f"{name} does not match its SHA-256"
    return None
