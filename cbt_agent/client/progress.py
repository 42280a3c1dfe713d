"""Progress of a backup or restore on a terminal: per disk, bytes done of the total, the rate
and the time left, on one updating line of stderr. Silent when stderr is not a terminal or with
`--quiet`."""

from __future__ import annotations

import sys
import time
from typing import TextIO

MIB = 1 << 20


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress:
    """Draws one updating line per disk when `stream` is a terminal and not `quiet`."""

    def __init__(
        self, stream: TextIO | None = None, interval: float = 0.1, *, quiet: bool = False
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self.interval = interval
        self.label = ""
        self.total = 0
        self.done = 0
        self._started = 0.0
        self._last = 0.0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self._started = time.monotonic()
        self._last = 0.0
        self._draw()

    def add(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def finish(self) -> None:
        self._draw()
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"  {self.label}: {self.done / MIB:9.1f} / {self.total / MIB:.1f} MiB ({pct:5.1f} %)"
        elapsed = time.monotonic() - self._started
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            text += f"  {rate / MIB:7.1f} MiB/s"
            if self.done < self.total:
                text += f"  ETA {_duration((self.total - self.done) / rate)}"
            else:
                text += f"  in {_duration(elapsed)}"
        return text

    def _draw(self) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + self.line() + "\x1b[K")
        self.stream.flush()
