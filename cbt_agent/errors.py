"""One exception tree for the agent. Every error maps onto a ZStack ErrorCode.

`code` is the ZStack error code the API reports; `field` names the offending input when there is
one, so a caller sees which parameter to fix.
"""

from __future__ import annotations

from typing import Final

# ZStack's error codes, defined once: every error class below and the API's ErrorCodes use these.
SYS_INTERNAL: Final = "SYS.1000"  # an internal error
SYS_TIMEOUT: Final = "SYS.1001"
SYS_OPERATION: Final = "SYS.1006"  # an operation error
SYS_INVALID: Final = "SYS.1007"  # an invalid argument
ID_SESSION_EXPIRED: Final = "ID.1001"


class CbtError(Exception):
    """Base of every error the agent raises on purpose."""

    code = SYS_OPERATION
    description = "An operation failed"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(CbtError):
    """Bad input: the message names the field."""

    code = SYS_INVALID
    description = "One or more API argument is invalid"


class NotFound(CbtError):
    """A task, VM or volume that does not exist (an invalid argument, as in ZStack)."""

    code = SYS_INVALID
    description = "One or more API argument is invalid"


class OperationError(CbtError):
    """The request is valid but cannot be done in the current state."""

    code = SYS_OPERATION
    description = "An operation failed"


class HypervisorError(CbtError):
    """libvirt or QEMU refused or failed."""

    code = SYS_OPERATION
    description = "An operation failed"


class QmpCommandError(HypervisorError):
    """A QMP command failed; carries what was sent and what came back: QMP's `error_class`
    (GenericError, DeviceNotFound, DeviceNotActive, ...) and its description."""

    def __init__(
        self, command: str, arguments: object, reply: str, error_class: str = "GenericError"
    ) -> None:
        super().__init__(f"QMP {command} failed: {error_class}: {reply} (arguments: {arguments})")
        self.command = command
        self.arguments = arguments
        self.reply = reply
        self.error_class = error_class


class QmpInterrupted(HypervisorError):
    """A QMP command whose reply never came (timeout, EOF, connection lost): QEMU may or may
    not have run it. Whoever sent it reads QEMU's state back instead of assuming either."""


class ConfigError(CbtError):
    """The configuration file is invalid: names the key and the reason."""

    code = SYS_INVALID
    description = "Invalid configuration"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config {key}: {reason}", field=key)
        self.key = key
        self.reason = reason
