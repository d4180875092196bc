"""The one exception type for user mistakes in data_tools."""

from __future__ import annotations


class DataToolsError(ValueError):
    """A mistake the user can fix (bad path, missing column, bad option).

    The message is one sentence naming the thing and what to do; command-line entry points
    print it and exit with status 1 instead of showing a traceback.
    """
