"""Offline exports without the stack: the pure plan (checkpoint cut on the files, change sets,
the daemon's nodes), the store's daemon rows and migration 4, the daemon's command line, QEMU's
start error read from a domain log, and stopping a process by pid (only the one started with
that pid file)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cbt_agent.engine.offline_plan import disk_view, image_nodes, plan_offline
from cbt_agent.engine.results import Unexported
from cbt_agent.hypervisor.libvirt import DiskInfo, start_error
from cbt_agent.model import BitmapState, Checkpoint, checkpoint_name, temp_bitmap_name
from cbt_agent.qemu import storage_daemon
from cbt_agent.qemu.images import ImageLayer
from cbt_agent.reasons import FULL_FIRST, TRACKING_LOST
from cbt_agent.store import DaemonExport, StorageDaemon, SyncStore
from cbt_agent.store.schema import _MIGRATIONS, SCHEMA_VERSION

TASK = "ab" * 16
VM = "cd" * 16
V0, V1 = "10" * 16, "20" * 16
SIZE = 1 << 26
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def bm(name: str, recording: bool = True, inconsistent: bool = False) -> BitmapState:
    return BitmapState(name, recording, True, inconsistent, False, 65536, 0)


def image(filename: str, *bitmaps: BitmapState) -> ImageLayer:
    return ImageLayer(filename, "qcow2", SIZE, {b.name: b for b in bitmaps})


def disk(i: int, volume: str) -> DiskInfo:
    return DiskInfo(volume, "", f"vd{'ab'[i]}", i, f"/img/{volume}.qcow2", "qcow2", "virtio")


def cp(seq: int, *volumes: str, tops: dict[str, str] | None = None) -> Checkpoint:
    return Checkpoint(
        TASK,
        seq,
        checkpoint_name(TASK, seq),
        frozenset(volumes),
        T0,
        tuple((v, SIZE) for v in volumes),
        True,
        tuple(sorted((tops or {}).items())),
    )


C1, C2, C3 = (checkpoint_name(TASK, n) for n in (1, 2, 3))


def test_incremental_offline_counts_from_the_latest_handed_out_over_the_chain() -> None:
    # disk 0: a snapshot overlay (libvirt's empty copy of C2 on the top, the writes before it
    # in the base's C2); disk 1: one image whose C2 still records
    v0 = disk_view(
        disk(0, V0),
        [
            image("/img/top0.qcow2", bm(C2)),
            image("/img/base0.qcow2", bm(C1, recording=False), bm(C2)),
        ],
    )
    v1 = disk_view(disk(1, V1), [image(f"/img/{V1}.qcow2", bm(C1, False), bm(C2))])
    checkpoints = [cp(1, V0, V1), cp(2, V0, V1, tops={V0: "/img/base0.qcow2"})]
    plan = plan_offline(TASK, VM, 3, [v0, v1], checkpoints, since_name=C1)
    assert plan.checkpoint == C3
    e0, e1 = plan.exports
    assert (e0.mode, e0.since, e0.temp_bitmap) == ("incremental", C1, temp_bitmap_name(TASK, 3))
    assert (e0.vm_uuid, e0.node, e0.image) == (VM, "cbt-d0-0", "/img/top0.qcow2")
    assert e1.mode == "incremental"
    # the change set merges C1 and C2 over both layers of disk 0
    merge0 = next(m for m in plan.enable.merges if m.node == "cbt-d0-0")
    assert set(merge0.sources) == {("cbt-d0-0", C2), ("cbt-d0-1", C2), ("cbt-d0-1", C1)}
    # the cut: the new bitmap added on each top, the recording one frozen after it
    assert [(c.image, c.new, c.freeze) for c in plan.cuts] == [
        ("/img/top0.qcow2", C3, (C2,)),
        (f"/img/{V1}.qcow2", C3, (C2,)),
    ]
    assert plan.enable.volumes == [V0, V1]


def test_offline_plan_fulls_with_reasons_and_stale_bitmaps() -> None:
    first = plan_offline(TASK, VM, 1, [disk_view(disk(0, V0), [image("/a")])], [])
    assert [(e.mode, e.reason) for e in first.exports] == [("full", FULL_FIRST)]
    assert first.cuts[0].freeze == ()
    # an inconsistent bitmap on the top (a crash): removed before the cut, and a full
    broken = disk_view(disk(0, V0), [image("/a", bm(C1, inconsistent=True))])
    plan = plan_offline(TASK, VM, 2, [broken], [cp(1, V0)])
    assert plan.exports[0].mode == "full" and "inconsistent" in str(plan.exports[0].reason)
    assert plan.stale == (("/a", C1),)
    # tracking lost at a crash: every disk full, the old chain superseded
    ok = disk_view(disk(0, V0), [image("/a", bm(C1))])
    lost = plan_offline(TASK, VM, 2, [ok], [cp(1, V0)], lost=TRACKING_LOST)
    assert lost.exports[0].reason == TRACKING_LOST
    assert lost.enable.superseded == (C1,)
    # a top made offline without the task's bitmap (qemu-img snapshot): full, naming it
    swapped = disk_view(disk(0, V0), [image("/new"), image("/a", bm(C1))])
    plan = plan_offline(TASK, VM, 2, [swapped], [cp(1, V0, tops={V0: "/a"})])
    assert plan.exports[0].mode == "full"
    assert "changed from /a to /new" in str(plan.exports[0].reason)


def test_the_daemon_opens_every_image_bottom_first_read_only() -> None:
    v = disk_view(disk(1, V1), [image("/top,1"), image("/base")])
    nodes = image_nodes([v])
    assert [(n.node, n.filename, n.backing) for n in nodes] == [
        ("cbt-d1-1", "/base", None),
        ("cbt-d1-0", "/top,1", "cbt-d1-1"),
    ]
    cmd = storage_daemon.command("/s/x.pid", "/s/a,b.qmp", nodes)
    assert cmd[:4] == ["qemu-storage-daemon", "--daemonize", "--pidfile", "/s/x.pid"]
    assert "socket,id=cbtmon,path=/s/a,,b.qmp,server=on,wait=off" in cmd
    blockdevs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--blockdev"]
    assert blockdevs == [
        '{"driver":"file","node-name":"cbt-d1-1-file","filename":"/base","read-only":true}',
        '{"driver":"qcow2","node-name":"cbt-d1-1","file":"cbt-d1-1-file","backing":null,'
        '"read-only":true}',
        '{"driver":"file","node-name":"cbt-d1-0-file","filename":"/top,1","read-only":true}',
        '{"driver":"qcow2","node-name":"cbt-d1-0","file":"cbt-d1-0-file","backing":"cbt-d1-1",'
        '"read-only":true}',
    ]


def test_daemon_rows_and_migration_4(tmp_path: Path) -> None:
    path = tmp_path / "cbt-agent.db"
    conn = sqlite3.connect(path)
    for migration in _MIGRATIONS[:3]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    old = SyncStore(path, readonly=True)  # `status` on a database of an older agent
    assert old.storage_daemons() == [] and old.storage_daemon(VM) is None
    assert old.daemon_exports(VM) == []
    old.close()
    s = SyncStore(path)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 4
        daemon = StorageDaemon(VM, TASK, None, "/s/x.pid", "/s/x.qmp", ("/a", "/b"), "planned", T0)
        export = DaemonExport(
            VM, V0, C1, "cbt-d0-0", "/a", f"cbtexp-{V0}", None, "full", None, "why", SIZE, 65536
        )
        s.record_daemon(daemon, [export])
        assert s.storage_daemon(VM) == daemon
        assert s.daemon_exports(VM) == [export]
        s.set_daemon_pid(VM, 4242)
        assert s.storage_daemon(VM) == StorageDaemon(
            VM, TASK, 4242, "/s/x.pid", "/s/x.qmp", ("/a", "/b"), "started", T0
        )
        assert s.storage_daemons() == [s.storage_daemon(VM)]
        s.forget_daemon(VM)
        assert s.storage_daemon(VM) is None and s.daemon_exports(VM) == []
    finally:
        s.close()


def test_start_error_is_qemus_last_error_with_its_hint() -> None:
    log = (
        "2026-12-03 11:47:18.100+0000: starting up libvirt version: 9.0.0\n"
        '2026-12-03T11:47:18.117774Z qemu-system-x86_64: -blockdev {"node-name":'
        '"libvirt-1-format","read-only":false}: Failed to get "write" lock\n'
        "Is another process using the image [/img/a.qcow2]?\n"
        "2026-12-03 11:47:18.200+0000: shutting down, reason=failed\n"
    )
    assert start_error(log) == (
        'Failed to get "write" lock (Is another process using the image [/img/a.qcow2]?)'
    )
    assert start_error("2026-12-03 11:47:18.100+0000: starting up\n") is None
    u = Unexported(4242, ("/a",), (V0,), start_refused='Failed to get "write" lock')
    assert u.message == (
        "unexported: qemu-storage-daemon pid 4242 stopped, the images' locks released; a start "
        'of the VM failed while they were held (Failed to get "write" lock): it can start now'
    )
    assert Unexported(None, ("/a",), (V0,)).message.startswith(
        "unexported: qemu-storage-daemon had exited"
    )


def _impostor(pid_file: Path, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A process that looks like the daemon (argv[0] and its pid file), started here."""
    code = "import signal,time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen(
        [storage_daemon.BINARY, "-c", code, "--pidfile", str(pid_file)],
        executable=sys.executable,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    pid_file.write_text(f"{proc.pid}\n")
    return proc


def test_stop_by_pid_term_then_kill_and_never_a_stranger(tmp_path: Path) -> None:
    pid_file = tmp_path / "x.pid"
    proc = _impostor(pid_file)
    try:
        assert storage_daemon.running_pid(None, str(pid_file)) == proc.pid  # from the pid file
        # another pid file names another daemon: that pid is not signalled
        assert not storage_daemon.is_ours(proc.pid, str(tmp_path / "other.pid"))
        assert asyncio.run(storage_daemon.stop(proc.pid, str(tmp_path / "other.pid"))) is None
        assert proc.poll() is None
        assert asyncio.run(storage_daemon.stop(proc.pid, str(pid_file))) == proc.pid
        assert proc.wait(5) == -signal.SIGTERM
        assert not pid_file.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    stubborn = _impostor(pid_file, ignore_term=True)
    try:
        began = time.monotonic()
        assert asyncio.run(storage_daemon.stop(None, str(pid_file), grace=0.3)) == stubborn.pid
        assert stubborn.wait(5) == -signal.SIGKILL
        assert time.monotonic() - began < 5
    finally:
        if stubborn.poll() is None:
            os.kill(stubborn.pid, signal.SIGKILL)
            stubborn.wait()
    assert asyncio.run(storage_daemon.stop(None, str(pid_file))) is None  # none runs


@pytest.mark.parametrize("field", ["vmInstanceUuid", "volumeUuids", "bitmapName", "force"])
def test_export_requests_refuse_bad_fields_naming_them(field: str) -> None:
    from cbt_agent.api import validate
    from cbt_agent.errors import InvalidArgument

    good = {"vmInstanceUuid": VM, "volumeUuids": [V0], "bitmapName": C1, "force": "true"}
    assert validate.export_volumes({"params": good}).force is True
    bad = {"vmInstanceUuid": "x", "volumeUuids": ["y"], "bitmapName": "a b", "force": "maybe"}
    with pytest.raises(InvalidArgument) as e:
        validate.export_volumes({"params": {**good, field: bad[field]}})
    assert e.value.field == field
    tagged = validate.export_volumes(
        {"params": {"vmInstanceUuid": VM}, "systemTags": [f"bitmapName::{C2}"]}
    )
    assert (tagged.bitmap_name, tagged.volume_uuids, tagged.force) == (C2, (), False)
    assert validate.unexport_volumes({"params": {"vmInstanceUuid": VM.upper()}}).vm_uuid == VM
