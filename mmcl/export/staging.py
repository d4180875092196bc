"""Write a folder aside and rename it into place only when everything in it succeeded."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder of `out`; on success it replaces `out`, on any error it is removed.

    So an export folder that exists is one that was written (and checked) completely.
    """
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
