"""The contract's string forms (regular expressions), each defined once. No imports: the
backup client, which starts once per backup, reads them without loading the models."""

from __future__ import annotations

from typing import Final

# A ZStack uuid: 32 hex digits, either case, no dashes (tasks, VMs, volumes, jobs, tags).
UUID_PATTERN: Final = "^[0-9a-fA-F]{32}$"
# A checkpoint (bitmap) name as a caller may pass it back to Enable.
BITMAP_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$"
# A checkpoint name as the agent cuts it (`model.checkpoint_name`): "cbt-", the first 12 hex
# digits of the task uuid, "-", the sequence number (at least 6 digits). Clients may build file
# names from it; anything else in a reply's bitmapName is not the agent's.
CHECKPOINT_PATTERN: Final = "^cbt-[0-9a-f]{12}-[0-9]{6,}$"
# ZStack's (Gson's default) date form, e.g. "Nov 7, 2026 9:05:03 PM" (server-local time).
DATE_PATTERN: Final = r"^[A-Z][a-z]{2} \d{1,2}, \d{4} \d{1,2}:\d{2}:\d{2} (AM|PM)$"
# An NBD TLS pre-shared key handed out by Enable: the identity (TLS username) and the 256-bit
# key in lower-case hex, as a keys.psk line `identity:key` holds them.
PSK_IDENTITY_PATTERN: Final = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PSK_KEY_PATTERN: Final = "^[0-9a-f]{64}$"
