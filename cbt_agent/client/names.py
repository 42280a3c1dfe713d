"""The names the client accepts from the agent's replies and from manifest.json: pure checks.

Neither source is trusted, and both end up in file names. A volume uuid (or VM, task uuid) is
32 hex digits and a checkpoint is the agent's own form (`cbt-<12 hex>-<sequence>`), as the
contract defines them; a backup file's name is exactly the one the client builds from those.
Checked with `fullmatch`: a `$` in the contract's patterns also matches before a final newline.
"""

from __future__ import annotations

import re

from cbt_agent.contract.patterns import CHECKPOINT_PATTERN, UUID_PATTERN

_UUID = re.compile(UUID_PATTERN)
_CHECKPOINT = re.compile(CHECKPOINT_PATTERN)

UUID_FORM = "32 hex digits"
CHECKPOINT_FORM = "the agent's checkpoint form cbt-<12 hex>-<sequence>"


def is_uuid(value: object) -> bool:
    """A ZStack uuid (VM, task, volume): 32 hex digits, nothing else."""
    return isinstance(value, str) and _UUID.fullmatch(value) is not None


def is_checkpoint_name(value: object) -> bool:
    """A checkpoint (bitmap) name as the agent cuts it."""
    return isinstance(value, str) and _CHECKPOINT.fullmatch(value) is not None


def is_plain_name(value: object) -> bool:
    """A file name that stays in the directory it is joined to."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and "\0" not in value
    )
