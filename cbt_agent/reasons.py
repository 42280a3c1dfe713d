"""Why a disk's Enable is a full: the reasons the rules give (templates filled with names), and
the class of each for counting (metrics). Pure."""

from __future__ import annotations

import re

FULL_FIRST = "first checkpoint of this disk: no earlier change tracking"
FULL_NONE_HANDED_OUT = (
    "no checkpoint of this task was handed out on this host yet: pass bitmapName (the last "
    "checkpoint you hold) for an incremental"
)
FULL_UNKNOWN = "checkpoint {name} is unknown to this task"
FULL_REMOVED = "checkpoint {name} was removed by retention"
TRACKING_LOST = "change tracking lost after unclean shutdown"
FULL_NEW_DISK = "disk was added after checkpoint {name}"
FULL_RESIZED = "disk was resized since checkpoint {name} ({old} -> {new} bytes)"
FULL_MISSING = "bitmap {bitmap} is missing on this disk (change tracking lost)"
FULL_INCONSISTENT = "change tracking lost after unclean shutdown (bitmap {bitmap} inconsistent)"
FULL_NEW_TOP = (
    "the disk's top image changed from {old} to {new} without change tracking "
    "(bitmap {bitmap} is not on it: a snapshot or copy made outside libvirt, or offline)"
)
FULL_GAP = (
    "bitmap {bitmap} is missing on backing image {image}: changes made while it was the top "
    "are not tracked"
)
FULL_BROKEN = "change tracking of this disk was interrupted before checkpoint {name}: {why}"
FULL_LAYER_SIZE = "backing image {image} is {old} bytes, the disk {new}: its bitmaps cannot merge"


# The class of each reason for a full, for counting (metrics): what a template starts with.
_REASON_CLASSES: tuple[tuple[str, str], ...] = (
    (FULL_FIRST, "first"),
    (FULL_NONE_HANDED_OUT, "first"),
    (FULL_UNKNOWN, "base"),
    (FULL_REMOVED, "base"),
    (FULL_MISSING, "missing"),
    (FULL_INCONSISTENT, "inconsistent"),
    (TRACKING_LOST, "inconsistent"),
    (FULL_NEW_DISK, "new_disk"),
    (FULL_RESIZED, "resized"),
    (FULL_LAYER_SIZE, "resized"),
    (FULL_NEW_TOP, "chain_changed"),
    (FULL_GAP, "chain_changed"),
    (FULL_BROKEN, "chain_changed"),
)


def _template_pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{[a-z_]+\}", template)
    return re.compile(".*".join(re.escape(p) for p in parts), re.DOTALL)


_REASON_PATTERNS = tuple((_template_pattern(t), cls) for t, cls in _REASON_CLASSES)


def full_reason_class(reason: str) -> str:
    """ "first", "base", "missing", "inconsistent", "new_disk", "resized", "chain_changed", or
    "other": which of the reasons above `reason` is an instance of."""
    for pattern, cls in _REASON_PATTERNS:
        if pattern.match(reason):
            return cls
    return "other"
