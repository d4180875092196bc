"""Read WebDataset tar shards member by member, grouped into samples, noticing damage.

Shared by the inspector and the tokenizer trainer. Grouping follows webdataset: a member
`dir/000010042.seg.jpg` has key `dir/000010042` and field `seg.jpg`; consecutive members
with the same key form one sample.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterator

from mmcl.data.shards import NoShardsError, expand_shards

from .errors import DataToolsError

_KEY_FIELD = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class ShardError(Exception):
    """A shard that cannot be opened ("unreadable") or ends early ("truncated")."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def expand_urls(specs: str | list[str]) -> list[str]:
    """Shard paths from brace patterns (`out/{00000..00009}.tar`), globs, `::`-joined lists or folders
    (mmcl's own expander, `mmcl.data.shards.expand_shards`); order kept, duplicates dropped. A named
    shard that does not exist stays (the inspector reports it); [] when nothing matches (`require_shards`)."""
    urls: list[str] = []
    for spec in [specs] if isinstance(specs, str) else list(specs):
        try:
            urls.extend(url for source in expand_shards(spec, require_existing=False) for url in source)
        except NoShardsError:  # an empty pattern or '::' part
            continue
    return list(dict.fromkeys(urls))


def split_member_name(name: str) -> tuple[str, str] | None:
    """`000010042.jpg` -> (`000010042`, `jpg`); None for names without an extension."""
    match = _KEY_FIELD.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def iter_samples(
    path: str | os.PathLike, member_limit: Callable[[str], int | None] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (key, {field: bytes}) for each sample of a tar shard, in file order.

    `member_limit(field)` bounds what is read of each member (see `iter_tar_samples`): a member
    above it is `mmcl.data.decode.Oversized`, one it rates None is `Unread`; None reads all.

    The tar parsing is the training pipeline's own (`mmcl.data.stream.iter_tar_samples`), so
    this tool judges a shard exactly as training will read it. Raises
    `ShardError("unreadable")` when nothing can be read and `ShardError("truncated")` when the
    file ends inside a member or lacks the end-of-archive marker; samples before the damage
    are yielded first.
    """
    from mmcl.data.stream import BrokenTar, iter_tar_samples

    try:
        stream = open(path, "rb")
    except OSError as error:
        raise ShardError("unreadable", error.strerror or type(error).__name__) from None
    with stream:
        try:
            for raw in iter_tar_samples(stream, str(path), keep=lambda index: True, member_limit=member_limit):
                fields = {name: data for name, data in raw.items() if not name.startswith("__")}
                yield raw["__key__"], fields
        except BrokenTar as error:
            raise ShardError("unreadable" if error.reason == "unreadable_shard" else "truncated", str(error)) from None


def require_shards(urls: list[str], spec: str | list[str]) -> list[str]:
    """Fail with one sentence when a shard pattern matches nothing."""
    if not urls:
        raise DataToolsError(
            f"no shard matches {spec!r}; pass a pattern like 'out/{{00000..00009}}.tar' or a folder of .tar files."
        )
    return urls
