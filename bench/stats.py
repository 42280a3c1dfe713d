"""Summaries the benchmarks print: median and p95 of a series, and a ratio against a limit."""

from __future__ import annotations

import asyncio
import math
import signal
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence


def median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1000.0


def p95_ms(seconds: Sequence[float]) -> float:
    """Nearest-rank 95th percentile (with 20 samples: the second largest)."""
    ordered = sorted(seconds)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] * 1000.0


def row(label: str, seconds: Sequence[float], width: int = 44) -> str:
    return (
        f"  {label:<{width}} n={len(seconds):<3d} median {median_ms(seconds):9.2f} ms"
        f"   p95 {p95_ms(seconds):9.2f} ms"
    )


def verdict(label: str, measured: Sequence[float], limit: Sequence[float], allowed: float) -> bool:
    """Print `measured / limit` (medians) against the allowed ratio; True when within it."""
    ratio = statistics.median(measured) / statistics.median(limit)
    p95_ratio = p95_ms(measured) / p95_ms(limit)
    ok = ratio <= allowed
    print(
        f"  RATIO {label}: {ratio:.2f}x (p95 {p95_ratio:.2f}x)  limit <= {allowed:.1f}x  "
        f"-> {'PASS' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


def run_guarded(name: str, run: Callable[[], Awaitable[int]]) -> None:
    """Run a benchmark and exit with its status. SIGTERM/SIGINT cancel it, so its finally
    blocks stop and remove everything it started; a timeout or an interruption exits 2."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await run()
        except (asyncio.CancelledError, TimeoutError) as e:
            what = "timed out" if isinstance(e, TimeoutError) else "interrupted"
            print(f"\n{name}: {what}; everything started was stopped", flush=True)
            return 2

    sys.exit(asyncio.run(guarded()))
