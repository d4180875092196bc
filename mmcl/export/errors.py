"""User-facing errors of export and push; each message is one sentence naming the thing and what to do."""
from __future__ import annotations


class ExportError(ValueError):
    """A run, checkpoint or export directory that cannot be exported or loaded."""


class PushError(RuntimeError):
    """An upload to the Hugging Face Hub that cannot start or did not complete.

    `committed` says what happened on the Hub: False (nothing was committed), True (the
    commit was created despite the error), or None (it could not be checked).
    """

    def __init__(self, message: str, committed: bool | None = False):
        super().__init__(message)
        self.committed = committed
