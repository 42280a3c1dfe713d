"""What QEMU's refusal of a command means. QMP gives a class only for "no such device"; most
refusals are GenericError and only their text tells, so the wordings relied on live here."""

from __future__ import annotations

from cbt_agent.errors import QmpCommandError

# QMP's classes for "no such thing"
_ABSENT_CLASSES = frozenset({"DeviceNotFound", "DeviceNotActive"})
_ABSENT_TEXT = ("not found", "cannot find")


def says(e: QmpCommandError, *needles: str) -> bool:
    """Whether QEMU's refusal says one of these things (case-insensitive)."""
    text = e.reply.lower()
    return any(n in text for n in needles)


def absent(e: QmpCommandError, *also: str) -> bool:
    """Whether QEMU refused because the thing is not there: by QMP's error class where it has
    one, else by its text (with `also`, other wordings of the same)."""
    return e.error_class in _ABSENT_CLASSES or says(e, *_ABSENT_TEXT, *also)
