"""The SQLite store on a real database file: schema, transitions, one task per VM, jobs."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from cbt_agent.errors import OperationError
from cbt_agent.model import Checkpoint, TaskStatus
from cbt_agent.store import SCHEMA_VERSION, Store, SyncStore, VolumeExport, utcnow

VM = "11" * 16
TASK = "22" * 16


@pytest.fixture
def store(tmp_path: Path) -> SyncStore:
    s = SyncStore(tmp_path / "state" / "cbt-agent.db")
    yield s
    s.close()


def test_database_is_private_wal_and_versioned(store: SyncStore) -> None:
    mode = stat.S_IMODE(store.path.stat().st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(store.path.parent.stat().st_mode) == 0o700
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db"
    SyncStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(OperationError, match="newer than this agent"):
        SyncStore(path)


def test_create_records_refs_and_first_transition(store: SyncStore) -> None:
    task = store.create_task(TASK, "n", None, VM, ["v1", "v2"])
    assert task.status is TaskStatus.CREATED
    refs = [(r.resource_uuid, r.resource_type) for r in store.resource_refs(TASK)]
    assert refs == [(VM, "VmInstanceVO"), ("v1", "VolumeVO"), ("v2", "VolumeVO")]
    assert [(h["from_status"], h["to_status"]) for h in store.history_rows(TASK)] == [
        (None, "Created")
    ]


def test_second_task_for_vm_is_refused_and_changes_nothing(store: SyncStore) -> None:
    store.create_task(TASK, "n", None, VM, ["v1"])
    with pytest.raises(OperationError) as err:
        store.create_task("33" * 16, "m", None, VM, ["v1"])
    assert err.value.message == f"VM [uuid: {VM}] have been protected by task: {TASK}"
    assert [t.uuid for t in store.list_tasks()] == [TASK]
    assert len(store.resource_refs("33" * 16)) == 0
    assert store.history_rows("33" * 16) == []


def test_every_transition_is_a_row_and_bad_ones_are_refused(store: SyncStore) -> None:
    store.create_task(TASK, "n", None, VM, [])
    store.set_status(TASK, TaskStatus.STARTING, "enable requested")
    store.set_status(TASK, TaskStatus.RUNNING, "exported")
    with pytest.raises(OperationError, match="from Running to Starting"):
        store.set_status(TASK, TaskStatus.STARTING, "again")
    store.set_status(TASK, TaskStatus.FAILED, "boom")
    store.delete_task(TASK, "deleted")
    rows = [(h["from_status"], h["to_status"], h["reason"]) for h in store.history_rows(TASK)]
    assert rows == [
        (None, "Created", "created"),
        ("Created", "Starting", "enable requested"),
        ("Starting", "Running", "exported"),
        ("Running", "Failed", "boom"),
        ("Failed", "Deleted", "deleted"),
    ]
    assert store.get_task(TASK) is None
    assert store.resource_refs(TASK) == []


def test_checkpoint_seq_is_never_reused(store: SyncStore) -> None:
    store.create_task(TASK, "n", None, VM, [])
    assert [store.next_checkpoint_seq(TASK) for _ in range(3)] == [1, 2, 3]
    store.add_checkpoint(TASK, 1, "c1", ["v1"], {"v1": 1 << 20})
    store.add_checkpoint(TASK, 2, "c2", ["v1"], {"v1": 2 << 20})
    store.mark_checkpoint_removed(TASK, "c1")
    assert [(c.name, c.size_of("v1")) for c in store.checkpoints(TASK)] == [("c2", 2 << 20)]
    assert store.removed_checkpoint_names(TASK) == ["c1"]


def test_exports_plan_round_trips(store: SyncStore) -> None:
    store.create_task(TASK, "n", None, VM, [])
    e = VolumeExport(
        TASK,
        "v1",
        "c1",
        "libvirt-1-format",
        "cbtsc-v1",
        "/s/x.qcow2",
        "j",
        "e",
        "tmp",
        "incremental",
        "c0",
        None,
        1 << 20,
        65536,
        "planned",
    )
    store.save_exports([e], "127.0.0.1", 10501)
    assert store.exports(TASK) == [e]
    assert store.used_nbd_ports() == {10501}
    store.clear_exports(TASK)
    assert store.exports(TASK) == [] and store.used_nbd_ports() == set()


def test_job_uuid_is_unique_and_results_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    s = SyncStore(path)
    assert s.create_job("aa" * 16, "EnableCbtTask", TASK, True)
    assert not s.create_job("aa" * 16, "EnableCbtTask", TASK)
    s.finish_job("aa" * 16, result={"x": 1})
    s.close()
    reopened = SyncStore(path, readonly=True)
    job = reopened.get_job("aa" * 16)
    assert job is not None and (job.state, job.result, job.want_schema) == (
        "Succeeded",
        {"x": 1},
        True,
    )
    reopened.close()


async def test_async_store_runs_on_its_own_thread(tmp_path: Path) -> None:
    import threading

    store = Store(tmp_path / "db")
    await store.open()
    names = await store.run(lambda _s: threading.current_thread().name)
    assert names.startswith("cbt-store")
    assert threading.current_thread().name != names
    await store.run(SyncStore.create_task, TASK, "n", None, VM, [])
    assert (await store.run(SyncStore.require_task, TASK)).name == "n"
    await store.close()


def _schema_2_db(path: Path) -> None:
    """A database as schema 2 left it: checkpoint 1 handed out (its Enable reached Running),
    checkpoint 2 kept after a failed Enable."""
    from cbt_agent.store.schema import _MIGRATIONS

    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0] + _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO tasks (uuid, name, vm_uuid, status, create_date, last_op_date) "
        f"VALUES ('{TASK}', 'n', '{VM}', 'Failed', '2026-01-01T00:00:00+00:00', "
        "'2026-01-01T00:00:00+00:00')"
    )
    for seq in (1, 2):
        conn.execute(
            "INSERT INTO checkpoints (task_uuid, seq, name, volumes, created) VALUES "
            f"('{TASK}', {seq}, 'cbt-222222222222-00000{seq}', '[\"v1\"]', "
            "'2026-01-01T00:00:00+00:00')"
        )
    for to, reason in (
        ("Running", "checkpoint cbt-222222222222-000001 exported (v1=full)"),
        ("Failed", "enable failed: injected"),
    ):
        conn.execute(
            "INSERT INTO transitions (task_uuid, from_status, to_status, reason, at) VALUES "
            f"('{TASK}', 'Starting', '{to}', '{reason}', '2026-01-01T00:00:00+00:00')"
        )
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()


def test_schema_2_migration_marks_the_checkpoints_that_were_handed_out(tmp_path: Path) -> None:
    path = tmp_path / "cbt-agent.db"
    _schema_2_db(path)
    old = SyncStore(path, readonly=True)  # `cbt-agent status` before the agent migrated it
    assert [c.name for c in old.checkpoints(TASK)] == [
        "cbt-222222222222-000001",
        "cbt-222222222222-000002",
    ]
    old.close()
    s = SyncStore(path)
    try:
        assert s.schema_version() == SCHEMA_VERSION == 4
        assert [(c.seq, c.handed_out, c.tops) for c in s.checkpoints(TASK)] == [
            (1, True, ()),
            (2, False, ()),
        ]
    finally:
        s.close()


def test_adopted_checkpoint_joins_the_chain_and_bumps_the_sequence(store: SyncStore) -> None:
    store.create_task(TASK, "n", None, VM, ["v1"])
    assert store.next_checkpoint_seq(TASK) == 1
    store.add_checkpoint(TASK, 1, "c1", ["v1"], {"v1": 1}, {"v1": "/a.qcow2"})
    store.mark_handed_out(TASK, "c1")
    c7 = Checkpoint(TASK, 7, "c7", frozenset({"v1"}), utcnow(), (("v1", 1),), handed_out=False)
    store.adopt_checkpoint(c7)
    assert [(c.name, c.handed_out, c.tops) for c in store.checkpoints(TASK)] == [
        ("c1", True, (("v1", "/a.qcow2"),)),
        ("c7", False, ()),
    ]
    assert store.known_checkpoint_names(TASK) == {"c1", "c7"}
    assert store.next_checkpoint_seq(TASK) == 8
