"""`cbt-agent serve | status | tasks | checkpoints | sweep | backup | restore | verify`.

Each command imports what it needs when it runs: `backup` starts once per backup, and the
event loop, the configuration's TLS and address parsing and the logging it does not use would
cost it more than an Enable.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from cbt_agent import __version__
from cbt_agent.errors import CbtError, ConfigError

if TYPE_CHECKING:
    from cbt_agent.config import Config
    from cbt_agent.engine.steps import StepHook


def _config(args: argparse.Namespace) -> Config:
    from cbt_agent.config import load_config

    return load_config(Path(args.config) if args.config else None)


async def _serve(config: Config, step: StepHook | None) -> None:
    import asyncio
    import contextlib
    import logging
    import ssl

    from aiohttp import web

    from cbt_agent.api import server
    from cbt_agent.api.app import STORE, make_app
    from cbt_agent.config import server_ssl_context
    from cbt_agent.sdnotify import Notifier
    from cbt_agent.store import SyncStore

    ssl_context = None
    if config.api.tls_cert is not None and config.api.tls_key is not None:
        try:
            ssl_context = server_ssl_context(config.api.tls_cert, config.api.tls_key)
        except (OSError, ssl.SSLError) as e:  # replaced or unreadable since the config loaded
            raise ConfigError("api.tls_cert", f"cannot load the certificate: {e}") from None
    notifier = Notifier.from_env()
    app = make_app(config, step=step)
    server.quiet_loop_errors(asyncio.get_running_loop())
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("cbt_agent.access"),
        keepalive_timeout=config.api.keepalive_timeout,
    )
    await runner.setup()  # opens the store, libvirt, and reconciles before listening
    listener = await server.listen(
        runner,
        config.api.host,
        config.api.port,
        ssl_context=ssl_context,
        max_connections=config.api.max_connections,
    )

    async def describe() -> str:
        by_status, exports = await app[STORE].run(SyncStore.counts)
        return status_line(by_status, exports)

    logging.getLogger("cbt_agent").info(
        "cbt-agent %s listening on %s://%s:%d (state %s)",
        __version__,
        "https" if ssl_context else "http",
        config.api.host,
        config.api.port,
        config.state_dir,
    )
    notifier.ready(await describe())
    pings = asyncio.create_task(notifier.run(describe))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("cbt_agent").info("stopping: finishing running operations")
    notifier.stopping()
    try:
        listener.close()  # no new connections; the open ones finish in cleanup
        await runner.cleanup()
    finally:
        pings.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pings
        notifier.close()


def status_line(by_status: dict[str, int], exports: int) -> str:
    """What `systemctl status` shows: "3 tasks (2 Running, 1 Stopped), 2 exports open"."""
    total = sum(by_status.values())
    parts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    tasks = f"{total} task{'s' if total != 1 else ''}" + (f" ({parts})" if parts else "")
    return f"{tasks}, {exports} export{'s' if exports != 1 else ''} open"


def serve(config: Config, *, step: StepHook | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT, logging to stderr. `step`: called between the
    steps of Enable, Disable and Delete (fault-injection tests install one; the product none).
    The state directory's lock is held throughout: one agent per database, and the operator
    commands can tell that an agent runs."""
    import asyncio

    from cbt_agent import logctx
    from cbt_agent.ops.presence import serving

    logctx.setup(config.log_level, access=config.log_access)
    with serving(config):
        asyncio.run(_serve(config, step))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    return serve(_config(args))


def _open_store(config: Config) -> Any:
    from cbt_agent.store import SyncStore

    if not config.db_path.exists():
        return None
    return SyncStore(config.db_path, readonly=True)


def cmd_status(args: argparse.Namespace) -> int:
    """Every task from the database alone: works while the agent is down."""
    from cbt_agent.ops import status

    config = _config(args)
    store = _open_store(config)
    rows: list[status.TaskSummary] = []
    if store is not None:
        try:
            rows = status.summaries(store)
        finally:
            store.close()
    if args.json:
        tasks = [status.to_json(r) for r in rows]
        print(json.dumps({"database": str(config.db_path), "tasks": tasks}, indent=2))
        return 0
    print(f"database: {config.db_path}" + ("" if store else " (not created yet)"))
    if not rows:
        print("no CBT tasks")
        return 0
    for line in status.lines(rows):
        print(line)
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    """One VM's bitmaps, per disk and layer, beside what the database expects: 0 consistent,
    1 mismatches (flagged). Reads only; the agent may be down."""
    from cbt_agent.ops import checkpoints

    config = _config(args)
    store = _open_store(config)
    try:
        import asyncio

        report = asyncio.run(checkpoints.inspect_checkpoints(config, store, args.vm_uuid))
    finally:
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(checkpoints.to_json(report), indent=2))
    else:
        for line in checkpoints.lines(report):
            print(line)
    return 0 if report.consistent else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """What the agent left that its database does not explain: listed (exit 1 when there is
    any), removed only with --apply, and then only while no agent runs (or with --force)."""
    from cbt_agent.hypervisor.libvirt import Hypervisor
    from cbt_agent.ops import sweep
    from cbt_agent.ops.presence import agent_presence

    config = _config(args)
    agent = agent_presence(config)
    if args.apply and agent.running and not args.force:
        print(
            f"cbt-agent: sweep --apply refused: the agent is running ({agent.how}); stop it "
            "first (its operations would race the sweep), or pass --force",
            file=sys.stderr,
        )
        return 2
    store = _open_store(config)
    vms = frozenset(args.vm) if args.vm else None

    async def run() -> tuple[list[sweep.Outcome], list[str]]:
        async with Hypervisor(config.libvirt_uri) as hv:
            free = not agent.running
            if args.apply:
                return await sweep.apply(config, store, hv, socket_free=free, vms=vms)
            found = await sweep.find(config, store, hv, socket_free=free, vms=vms)
            return sweep.planned(found), found.problems

    try:
        import asyncio

        outcomes, problems = asyncio.run(run())
    finally:
        if store is not None:
            store.close()
    if args.json:
        out = {
            "applied": bool(args.apply),
            "agent": agent.to_json(),
            "strays": [sweep.to_json(o) for o in outcomes],
            "problems": problems,
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"agent: {'running' if agent.running else 'not running'} ({agent.how})")
        if outcomes:
            for line in sweep.lines(outcomes):
                print(line)
        else:
            print(
                "nothing stray: no unknown bitmaps, NBD sockets, scratch files or storage daemons"
            )
        for problem in problems:
            print(f"not looked at: {problem}")
        if outcomes and not args.apply:
            print("run `cbt-agent sweep --apply` with the agent stopped to remove them")
    if args.apply:
        return 0 if sweep.settled(outcomes) and not problems else 1
    return 0 if not outcomes and not problems else 1


def cmd_tasks(args: argparse.Namespace) -> int:
    """One task with its checkpoints, exports and full status history."""
    config = _config(args)
    store = _open_store(config)
    if store is None:
        print(f"no database at {config.db_path}", file=sys.stderr)
        return 1
    try:
        task = store.get_task(args.uuid)
        history = store.history_rows(args.uuid)
        if task is None and not history:
            print(f"no task {args.uuid}", file=sys.stderr)
            return 1
        out: dict[str, Any] = {"uuid": args.uuid, "history": history}
        if task is not None:
            out.update(
                name=task.name,
                vmInstanceUuid=task.vm_uuid,
                status=task.status.value,
                reason=task.reason,
                checkpoints=[
                    {
                        "name": c.name,
                        "created": c.created.isoformat(timespec="seconds"),
                        "volumes": sorted(c.volumes),
                        "handedOut": c.handed_out,
                        "tops": dict(c.tops),
                    }
                    for c in store.checkpoints(task.uuid)
                ],
                exports=[
                    {
                        "volumeUuid": e.volume_uuid,
                        "mode": e.mode,
                        "since": e.since,
                        "phase": e.phase,
                        "scratch": e.scratch_path,
                    }
                    for e in store.exports(task.uuid)
                ],
            )
        else:
            out["status"] = "Deleted"
    finally:
        store.close()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"task {out['uuid']}  {out.get('name', '')}  VM {out.get('vmInstanceUuid', '-')}")
    print(f"status: {out['status']}" + (f" ({out['reason']})" if out.get("reason") else ""))
    for c in out.get("checkpoints", []):
        kept = "" if c["handedOut"] else "  (kept after a failed Enable: not a default base)"
        print(f"  checkpoint {c['name']}  {c['created']}  disks: {len(c['volumes'])}{kept}")
    for e in out.get("exports", []):
        print(f"  export {e['volumeUuid']}  {e['mode']}  since {e['since'] or '-'}  {e['phase']}")
    print("history:")
    for h in history:
        print(
            f"  {h['at'][:19]}  {h['from_status'] or '-':>8} -> {h['to_status']:8}  {h['reason']}"
        )
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    """One checkpoint of every disk of the VM into --dest (full first, then incrementals)."""
    import os

    from cbt_agent.client.auth import TokenError, refuse_command_line_token, session_token
    from cbt_agent.client.backup import BackupOptions, pause_after_from_env, run_backup
    from cbt_agent.client.progress import Progress

    try:
        if args.token is not None:
            raise refuse_command_line_token()
        token = session_token(args.token_file, os.environ)
    except TokenError as e:
        print(f"cbt-agent: {e.message}", file=sys.stderr)
        return 2
    opts = BackupOptions(
        url=args.url,
        token=token,
        vm_uuid=args.vm,
        dest=Path(args.dest),
        task_name=args.task_name,
        pause_after=pause_after_from_env(),
        cafile=args.cacert,
        nbd_tls_dir=args.nbd_tls_dir,
        quiesce=args.quiesce,
    )
    try:
        with _sigterm_raises():
            run_backup(opts, Progress(quiet=args.quiet))
    except _Terminated:
        print(
            "cbt-agent: backup stopped by SIGTERM: its partial files were removed and the "
            "manifest was left as it was",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    return 0


class _Terminated(BaseException):
    """SIGTERM, raised where the command is (as Ctrl-C raises KeyboardInterrupt), so its
    cleanup runs; a BaseException, so that no `except Exception` swallows it."""


class _sigterm_raises:
    """While inside: the first SIGTERM raises _Terminated; later ones are ignored, so the
    cleanup it started (files removed, the task disabled) is not cut short."""

    def __enter__(self) -> None:
        self._old = signal.signal(signal.SIGTERM, self._raise)

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self._old)

    @staticmethod
    def _raise(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated


def cmd_restore(args: argparse.Namespace) -> int:
    """One standalone qcow2 per disk as of a checkpoint."""
    from cbt_agent.client.progress import Progress
    from cbt_agent.client.restore import run_restore

    progress = Progress(quiet=args.quiet)
    run_restore(Path(args.dest), args.checkpoint, Path(args.out), progress)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every chain file against the manifest's sha256; files the manifest does not know."""
    from cbt_agent.client.verify import verify

    report = verify(Path(args.dir))
    for line in report.lines:
        print(line)
    if not report.ok:
        print(
            f"cbt-agent: verify failed: {len(report.problems)} problem(s): "
            + "; ".join(p.split(":")[0].split(maxsplit=1)[-1] for p in report.problems),
            file=sys.stderr,
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbt-agent", description="Changed-block tracking for KVM")
    p.add_argument("--version", action="version", version=f"cbt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            "-c",
            help="config file (default $CBT_AGENT_CONFIG or /etc/cbt-agent/config.toml)",
        )
        return sp

    with_config(sub.add_parser("serve", help="run the agent")).set_defaults(fn=cmd_serve)
    st = with_config(sub.add_parser("status", help="tasks from the database (agent may be down)"))
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status, look=True)
    tk = with_config(sub.add_parser("tasks", help="one task: checkpoints and status history"))
    tk.add_argument("uuid")
    tk.add_argument("--json", action="store_true")
    tk.set_defaults(fn=cmd_tasks, look=True)
    cp = with_config(
        sub.add_parser(
            "checkpoints",
            help="one VM's bitmaps per disk and layer beside the database (agent may be down)",
        )
    )
    cp.add_argument("vm_uuid", metavar="VM_UUID", help="vmInstanceUuid (the libvirt domain name)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(fn=cmd_checkpoints, look=True)
    sw = with_config(
        sub.add_parser("sweep", help="list what the agent left that its database does not explain")
    )
    sw.add_argument("--apply", action="store_true", help="remove them (the agent stopped)")
    sw.add_argument("--force", action="store_true", help="with --apply: even while the agent runs")
    sw.add_argument(
        "--vm",
        action="append",
        metavar="VM_UUID",
        help="look only at this VM's disks and NBD socket (repeatable; default: every VM)",
    )
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_sweep, look=True)
    bk = sub.add_parser("backup", help="back up every disk of a VM (full, then incremental)")
    bk.add_argument("--url", required=True, help="the agent, e.g. http://127.0.0.1:7090")
    bk.add_argument(
        "--token-file",
        help="file holding the OAuth session token, readable by you alone (chmod 600); "
        "default: $CBT_AGENT_TOKEN",
    )
    bk.add_argument(
        "--token", help="refused: a token on the command line shows in ps (see --token-file)"
    )
    bk.add_argument("--vm", required=True, help="vmInstanceUuid")
    bk.add_argument("--dest", required=True, help="backup directory (created if missing)")
    bk.add_argument("--task-name", help="name of the CBT task when one is created")
    bk.add_argument("--cacert", help="CA certificate (PEM) of an https agent")
    bk.add_argument(
        "--nbd-tls-dir", help="directory with the ca-cert.pem of the agent's NBD TLS exports"
    )
    bk.add_argument(
        "--quiesce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="freeze the guest's filesystems for the checkpoint (fails without a guest "
        "agent); --no-quiesce: never; default: the agent's [checkpoints] quiesce",
    )
    bk.set_defaults(fn=cmd_backup)
    rs = sub.add_parser("restore", help="standalone qcow2 images of a checkpoint's disks")
    rs.add_argument("--dest", required=True, help="backup directory")
    rs.add_argument("--checkpoint", help="checkpoint name (default: the latest)")
    rs.add_argument("--out", required=True, help="directory for <volumeUuid>.qcow2")
    for cmd in (bk, rs):
        cmd.add_argument(
            "--quiet", action="store_true", help="no progress line (shown only on a terminal)"
        )
    rs.set_defaults(fn=cmd_restore)
    vf = sub.add_parser("verify", help="check a backup directory against its manifest")
    vf.add_argument("dir", help="backup directory")
    vf.set_defaults(fn=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the operator commands (status, tasks, checkpoints, sweep): 1 means "found something", so
    # a failure to look is 2, and always one line, never a traceback
    look = bool(getattr(args, "look", False))
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"cbt-agent: invalid configuration: {e.message}", file=sys.stderr)
        return 2
    except CbtError as e:
        print(f"cbt-agent: {e.message}", file=sys.stderr)
        return 2 if look else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        import sqlite3

        if not look or not isinstance(e, OSError | sqlite3.Error):
            raise
        print(f"cbt-agent: {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
