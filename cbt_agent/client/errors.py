"""Errors of the backup client. They derive from the agent's CbtError, so `cbt-agent` prints
their message on one line and exits non-zero, never with a traceback."""

from __future__ import annotations

from cbt_agent.errors import CbtError


class BackupError(CbtError):
    """A backup, restore or verify could not be done; the message says why."""


class ApiError(BackupError):
    """The agent refused or failed a call: carries ZStack's error code and the HTTP status."""

    def __init__(self, message: str, *, status: int, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class CopyFailed(BackupError):
    """Reading an export failed in the middle of the copy (the agent may have ended it)."""


class ManifestError(BackupError):
    """manifest.json is unreadable or inconsistent."""


class UnknownCheckpoint(BackupError):
    """A checkpoint asked for is not in the manifest."""
