"""Progress of a backup on a terminal: bytes copied / total per disk, on stderr."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIB = 1 << 20


class Progress:
    """Draws one updating line per disk when `stream` is a terminal; silent otherwise."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.label = ""
        self.total = 0
        self.done = 0
        self._last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._last = label, total, 0, 0.0
        self._draw()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def finish(self) -> None:
        self._draw()
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.stream.write(
            f"\r  {self.label}: {self.done / MIB:9.1f} / {self.total / MIB:.1f} MiB ({pct:5.1f} %)"
        )
        self.stream.flush()
