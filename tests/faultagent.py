"""`cbt-agent serve` with a fault injected: the agent SIGKILLs itself when an operation reaches
a named step (see cbt_agent.engine.steps). Test-side only: the installed agent has no such
switch; this launcher hands the hook to the same `serve` the CLI runs.

    python tests/faultagent.py --config PATH --crash-at enable:scratch
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

# the checkout's cbt_agent, as `python -m cbt_agent` from its root would import it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbt_agent.cli import serve
from cbt_agent.config import load_config
from cbt_agent.engine.steps import StepHook


def kill_at(at: str) -> StepHook:
    """A step hook that SIGKILLs this process when the operation reaches step `at`."""

    async def hook(step: str) -> None:
        if step == at:
            logging.getLogger("cbt_agent").warning("fault injected at %s: SIGKILL now", at)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="faultagent")
    p.add_argument("--config", required=True)
    p.add_argument("--crash-at", required=True, metavar="STEP")
    args = p.parse_args(argv)
    return serve(load_config(Path(args.config)), step=kill_at(args.crash_at))


if __name__ == "__main__":
    sys.exit(main())
