"""`cbt-agent serve | status | tasks | backup | restore | verify`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cbt_agent import __version__
from cbt_agent.config import Config, load_config
from cbt_agent.errors import CbtError, ConfigError

if TYPE_CHECKING:
    from cbt_agent.engine.steps import StepHook


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config) if args.config else None)


async def _serve(config: Config, step: StepHook | None) -> None:
    from aiohttp import web

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
    runner = web.AppRunner(app, access_log=logging.getLogger("cbt_agent.access"))
    await runner.setup()  # opens the store, libvirt, and reconciles before listening
    site = web.TCPSite(runner, config.api.host, config.api.port, ssl_context=ssl_context)
    await site.start()

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
    steps of Enable, Disable and Delete (fault-injection tests install one; the product none)."""
    from cbt_agent import logctx

    logctx.setup(config.log_level, access=config.log_access)
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
    config = _config(args)
    store = _open_store(config)
    rows: list[dict[str, Any]] = []
    if store is not None:
        for t in store.list_tasks():
            cps = store.checkpoints(t.uuid)
            server = store.nbd_server(t.uuid)
            nbd = f"{server.host}:{server.port}" if server.port else server.socket
            if nbd and server.tls:
                nbd += " (TLS)"
            rows.append(
                {
                    "uuid": t.uuid,
                    "name": t.name,
                    "vmInstanceUuid": t.vm_uuid,
                    "status": t.status.value,
                    "reason": t.reason,
                    "lastOpDate": t.last_op_date.isoformat(timespec="seconds"),
                    "checkpoints": len(cps),
                    "latestCheckpoint": cps[-1].name if cps else None,
                    "nbd": nbd,
                }
            )
        store.close()
    if args.json:
        print(json.dumps({"database": str(config.db_path), "tasks": rows}, indent=2))
        return 0
    print(f"database: {config.db_path}" + ("" if store else " (not created yet)"))
    if not rows:
        print("no CBT tasks")
        return 0
    print(f"{'TASK':32}  {'VM':32}  {'STATUS':8}  {'CKPTS':>5}  {'NBD':21}  REASON")
    for r in rows:
        print(
            f"{r['uuid']:32}  {r['vmInstanceUuid']:32}  {r['status']:8}  {r['checkpoints']:>5}  "
            f"{r['nbd'] or '-':21}  {r['reason'] or ''}"
        )
    return 0


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
        asyncio.run(_cancel_on_sigterm(run_backup(opts, Progress(quiet=args.quiet))))
    except _Terminated:
        print(
            "cbt-agent: backup stopped by SIGTERM: its partial files were removed and the "
            "manifest was left as it was",
            file=sys.stderr,
        )
        return 128 + signal.SIGTERM
    return 0


class _Terminated(Exception):
    pass


async def _cancel_on_sigterm(coro: Any) -> Any:
    """Run `coro`; SIGTERM cancels it (as Ctrl-C does), so its cleanup runs."""
    task = asyncio.ensure_future(coro)
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await task
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise


def cmd_restore(args: argparse.Namespace) -> int:
    """One standalone qcow2 per disk as of a checkpoint."""
    from cbt_agent.client.progress import Progress
    from cbt_agent.client.restore import run_restore

    progress = Progress(quiet=args.quiet)
    asyncio.run(run_restore(Path(args.dest), args.checkpoint, Path(args.out), progress))
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
    st.set_defaults(fn=cmd_status)
    tk = with_config(sub.add_parser("tasks", help="one task: checkpoints and status history"))
    tk.add_argument("uuid")
    tk.add_argument("--json", action="store_true")
    tk.set_defaults(fn=cmd_tasks)
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
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"cbt-agent: invalid configuration: {e.message}", file=sys.stderr)
        return 2
    except CbtError as e:
        print(f"cbt-agent: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
