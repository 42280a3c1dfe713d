"""Named points between the steps of Enable, Disable and Delete ("enable:planned", ...).

The engine calls a `StepHook` with each name as it passes it; the product installs none.
Fault-injection tests install one (`make_app(config, step=...)`) that kills the agent or raises
at a chosen step, and check that the next start reconciles to a true state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

StepHook = Callable[[str], Awaitable[None]]
