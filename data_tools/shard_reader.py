"""Read WebDataset tar shards member by member, grouped into samples, noticing damage.

Shared by the inspector and the tokenizer trainer. Grouping follows webdataset: a member
`dir/000010042.seg.jpg` has key `dir/000010042` and field `seg.jpg`; consecutive members
with the same key form one sample.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator

from braceexpand import braceexpand

from .errors import DataToolsError

_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class ShardError(Exception):
    """A shard that cannot be opened ("unreadable") or ends early ("truncated")."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def expand_urls(specs: str | list[str]) -> list[str]:
    """Shard paths from brace patterns (`out/{00000..00009}.tar`), globs, `::`-joined lists or folders.

    A folder stands for the sorted `.tar` files in it. Order is kept, duplicates dropped.
    """
    specs = [specs] if isinstance(specs, str) else list(specs)
    urls: list[str] = []
    for spec in specs:
        for part in spec.split("::"):
            for url in braceexpand(part):
                if os.path.isdir(url):
                    urls.extend(sorted(str(p) for p in Path(url).glob("*.tar")))
                elif any(ch in url for ch in "*?["):
                    urls.extend(sorted(glob.glob(url)))
                else:
                    urls.append(url)
    return list(dict.fromkeys(urls))


def split_member_name(name: str) -> tuple[str, str] | None:
    """`000010042.jpg` -> (`000010042`, `jpg`); None for names without an extension."""
    match = _KEY_FIELD.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {field: bytes}) for each sample of a tar shard, in file order.

    Raises `ShardError("unreadable")` when the file cannot be opened as a tar and
    `ShardError("truncated")` when it ends inside a member or lacks the end-of-archive
    marker (a write that did not finish); samples before the damage are yielded first.
    """
    try:
        tar = tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise ShardError("unreadable", "file not found") from None
    except tarfile.ReadError:
        raise ShardError("unreadable", "not a tar file (or an empty one)") from None
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ShardError("unreadable", f"{type(error).__name__}: {error}") from None
    with tar:
        key, fields = None, {}
        end_of_data = 0
        try:
            for member in tar:
                if not member.isfile():
                    continue
                parts = split_member_name(member.name)
                if parts is None or os.path.basename(member.name).startswith("."):
                    continue
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                end_of_data = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if parts[0] != key:
                    if key is not None:
                        yield key, fields
                    key, fields = parts[0], {}
                fields[parts[1]] = data
        except (tarfile.TarError, OSError, EOFError) as error:
            if key is not None:
                yield key, fields  # the last complete members still form a (possibly partial) sample
            raise ShardError("truncated", str(error) or type(error).__name__) from None
        if key is not None:
            yield key, fields
        # tarfile stops quietly when a file is cut between members; the two zero blocks
        # that end every finished archive tell (checked on uncompressed files only).
        if not _compressed(path) and os.path.getsize(path) < end_of_data + 2 * tarfile.BLOCKSIZE:
            raise ShardError("truncated", "missing end-of-archive marker")


def _compressed(path: str | os.PathLike) -> bool:
    """gzip, bzip2 or xz magic bytes at the start of the file."""
    with open(path, "rb") as handle:
        head = handle.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))


def require_shards(urls: list[str], spec: str | list[str]) -> list[str]:
    """Fail with one sentence when a shard pattern matches nothing."""
    if not urls:
        raise DataToolsError(
            f"no shard matches {spec!r}; pass a pattern like 'out/{{00000..00009}}.tar' or a folder of .tar files."
        )
    return urls
