"""The user errors of `mmcl curate`: one sentence each, printed as one line with exit status 2."""
from __future__ import annotations

import sys


class CurateError(ValueError):
    """A mistake the user can fix (bad --out, no shards, a bad rule, another job's folder); one sentence."""


def exit_error(error: Exception) -> int:
    """Print a user error as one line (credentials redacted) and return the exit status 2."""
    from mmcl.redact import redact

    print(f"mmcl: error: {redact(str(error))}", file=sys.stderr, flush=True)
    return 2
