"""ZStack ErrorCodes: the codes (from `cbt_agent.errors`, where each error class carries its own)
and the ErrorCode objects replies carry."""

from __future__ import annotations

from typing import Any

from cbt_agent.contract.replies import ErrorCode
from cbt_agent.errors import (
    ID_SESSION_EXPIRED,
    SYS_INTERNAL,
    SYS_INVALID,
    SYS_OPERATION,
    SYS_TIMEOUT,
    CbtError,
)

__all__ = [
    "ID_SESSION_EXPIRED",
    "SYS_INTERNAL",
    "SYS_INVALID",
    "SYS_OPERATION",
    "SYS_TIMEOUT",
    "error_code",
    "error_from_exception",
]


def error_code(
    code: str, description: str, details: str, cause: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A ZStack ErrorCode. ``cause`` (a nested ErrorCode) is present only when given."""
    nested = ErrorCode.model_validate(cause) if cause is not None else None
    return ErrorCode(code=code, description=description, details=details, cause=nested).wire()


def error_from_exception(exc: CbtError) -> dict[str, Any]:
    """The ErrorCode for one of the agent's own errors: its code, description and message."""
    return error_code(exc.code, exc.description, exc.message)
