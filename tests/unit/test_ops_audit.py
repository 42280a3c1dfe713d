"""The operator commands' pure parts and their SQLite reads: the audit of a disk's bitmaps
against the database (every flag), bitmap names, the status summary with the last Enable's
changed bytes, the state directory's lock, and the aligned tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cbt_agent.cli import main
from cbt_agent.config import parse_config
from cbt_agent.errors import OperationError
from cbt_agent.model import (
    BitmapState,
    CbtTask,
    Checkpoint,
    Layer,
    TaskStatus,
    checkpoint_name,
    temp_bitmap_name,
)
from cbt_agent.ops import status, table
from cbt_agent.ops.audit import Flag, Recorded, agent_bitmap, audit_disk, task_prefix
from cbt_agent.ops.presence import lock_holder, serving
from cbt_agent.store import SyncStore

TASK = "859815fe08ce41aea653bfaf8f6a5548"
OTHER = "0123456789ab41aea653bfaf8f6a5548"
VOL = "88ee5ef3c9a54a2a8a5c5c4b9a0b7c53"
NOW = datetime(2026, 11, 27, 7, 37, 2, tzinfo=UTC)


def bm(name: str, *, recording: bool = False, inconsistent: bool = False) -> BitmapState:
    return BitmapState(name, recording, True, inconsistent, False, 65536, 0)


def layer(filename: str, *names: str, recording: str | None = None, bad: str = "") -> Layer:
    states = {n: bm(n, recording=n == recording, inconsistent=n == bad) for n in names}
    return Layer(node=f"n-{filename}", filename=filename, size=1 << 26, bitmaps=states)


def cp(seq: int, top: str = "top.qcow2", task: str = TASK) -> Checkpoint:
    return Checkpoint(
        task_uuid=task,
        seq=seq,
        name=checkpoint_name(task, seq),
        volumes=frozenset({VOL}),
        created=NOW,
        sizes=((VOL, 1 << 26),),
        tops=((VOL, top),),
    )


def task(uuid: str = TASK, vm: str = "a" * 32) -> CbtTask:
    return CbtTask(uuid, "t", None, vm, TaskStatus.STOPPED, NOW, NOW)


def recorded(*cps: Checkpoint, **kw: object) -> Recorded:
    t = task()
    return Recorded(task=t, checkpoints=cps, tasks_by_prefix={task_prefix(TASK): t}, **kw)  # type: ignore[arg-type]


C1, C2 = checkpoint_name(TASK, 1), checkpoint_name(TASK, 2)


def flags(audit: object) -> list[tuple[int | None, str, str, tuple[Flag, ...]]]:
    return [(r.layer, r.name, r.state, r.flags) for r in audit.bitmaps if r.flags]  # type: ignore[attr-defined]


def test_agent_bitmap_names_come_from_the_models_naming() -> None:
    assert agent_bitmap(C1) is not None and agent_bitmap(C1).seq == 1  # type: ignore[union-attr]
    tmp = agent_bitmap(temp_bitmap_name(TASK, 7))
    assert tmp is not None and (tmp.prefix, tmp.seq, tmp.temporary) == (TASK[:12], 7, True)
    for name in ("cbt-859815FE08CE-000001", "cbt-859815fe08ce-1", "backup-1", "cbt-tmp-x-000001"):
        assert agent_bitmap(name) is None
    assert task_prefix(TASK) == agent_bitmap(C1).prefix  # type: ignore[union-attr]


def test_a_consistent_chain_across_a_libvirt_snapshot() -> None:
    # checkpoint 1 cut on base; libvirt's snapshot copied it (recording) onto the overlay;
    # checkpoint 2 cut on the overlay; a foreign bitmap is shown, never judged
    chain = [
        layer("top.qcow2", C1, C2, "backup-1", recording=C2),
        layer("base.qcow2", C1),
    ]
    audit = audit_disk(VOL, "vda", chain, recorded(cp(1, "base.qcow2"), cp(2, "top.qcow2")))
    assert audit.consistent and flags(audit) == []
    by = {(r.layer, r.name): r for r in audit.bitmaps}
    assert by[(0, C2)].expected == "checkpoint 2 (latest)"
    assert by[(0, C2)].state == "recording"
    assert by[(1, C1)].expected == "checkpoint 1"
    assert by[(0, "backup-1")].expected is None
    plan = audit.next_enable
    assert plan is not None and (plan.mode, plan.since) == ("incremental", C2)


def test_missing_inconsistent_unknown_and_wrong_layer_are_flagged() -> None:
    other = checkpoint_name(OTHER, 3)
    stranger = checkpoint_name("fedcba987654" + "0" * 20, 1)
    chain = [
        layer("top.qcow2", C2, other, stranger, temp_bitmap_name(TASK, 2), recording=C2),
        layer("base.qcow2", checkpoint_name(TASK, 9), bad=checkpoint_name(TASK, 9)),
    ]
    rec = Recorded(
        task=task(),
        checkpoints=(cp(1, "base.qcow2"), cp(2)),
        tasks_by_prefix={task_prefix(TASK): task(), task_prefix(OTHER): task(OTHER, "b" * 32)},
    )
    got = flags(audit_disk(VOL, "vda", chain, rec))
    assert got == [
        (0, other, "frozen", (Flag.UNKNOWN,)),
        (0, stranger, "frozen", (Flag.UNKNOWN,)),
        (0, temp_bitmap_name(TASK, 2), "frozen", (Flag.UNKNOWN,)),
        (1, C1, "absent", (Flag.MISSING,)),
        (1, checkpoint_name(TASK, 9), "inconsistent", (Flag.INCONSISTENT, Flag.UNKNOWN)),
    ]
    rows = {r.name: r for r in audit_disk(VOL, "vda", chain, rec).bitmaps}
    assert rows[other].detail == f"of task {OTHER} (VM {'b' * 32})"
    assert "sweep" in str(rows[stranger].detail)


def test_the_open_exports_change_set_and_a_retention_leftover() -> None:
    tmp = temp_bitmap_name(TASK, 2)
    chain = [layer("top.qcow2", C2, tmp, recording=C2), layer("base.qcow2", C1)]
    rec = recorded(cp(2), temp_bitmaps={VOL: tmp}, removed=frozenset({C1}))
    audit = audit_disk(VOL, "vda", chain, rec)
    rows = {r.name: r for r in audit.bitmaps}
    assert rows[tmp].flags == () and rows[tmp].expected == "change set of the open export"
    assert rows[C1].flags == (Flag.UNKNOWN,) and "retention" in str(rows[C1].detail)


def test_a_top_made_without_tracking_is_the_wrong_layer() -> None:
    # a snapshot behind libvirt's back (or qemu-img while the VM was off): the new top has no
    # bitmap, the latest checkpoint sits on the image it was cut on, now a backing file
    chain = [layer("new.qcow2"), layer("top.qcow2", C1, C2, recording=C2)]
    audit = audit_disk(VOL, "vda", chain, recorded(cp(1), cp(2)))
    assert flags(audit) == [(0, C2, "absent", (Flag.WRONG_LAYER,))]
    assert "found on layer 1" in str(audit.bitmaps[0].detail)
    assert audit.tracking is not None and "new.qcow2" in audit.tracking


def test_a_checkpoint_below_the_image_it_was_cut_on() -> None:
    chain = [layer("top.qcow2", C2, recording=C2), layer("base.qcow2", C1)]
    audit = audit_disk(VOL, "vda", chain, recorded(cp(1, "top.qcow2"), cp(2)))
    assert flags(audit) == [
        (0, C1, "absent", (Flag.WRONG_LAYER,)),  # where it was cut
        (1, C1, "frozen", (Flag.WRONG_LAYER,)),  # below it
    ]


def test_no_task_every_agent_bitmap_is_unknown() -> None:
    chain = [layer("top.qcow2", C1, "backup-1")]
    audit = audit_disk(VOL, "vda", chain, Recorded(None))
    assert flags(audit) == [(0, C1, "frozen", (Flag.UNKNOWN,))]
    assert audit.next_enable is None


def test_tables_align_and_sizes_read_well() -> None:
    lines = table.render(["A", "NUM", "LAST"], [["x", "1", "long text"], ["yyy", "100", "-"]], (1,))
    assert lines == ["A    NUM  LAST", "x      1  long text", "yyy  100  -"]
    assert [table.size(n) for n in (None, 0, 65536, 1536 * 1024)] == [
        "-",
        "0 B",
        "64 KiB",
        "1.5 MiB",
    ]


def _store(tmp_path: Path) -> SyncStore:
    s = SyncStore(tmp_path / "cbt-agent.db")
    s.create_task(TASK, "nightly", None, "a" * 32, [VOL])
    return s


def _enable_result(changed: int) -> dict[str, object]:
    info = {
        "volume": {
            "volumeUuid": VOL,
            "installPath": "/x.qcow2",
            "deviceId": 0,
            "deviceType": "file",
            "format": "qcow2",
            "useVirtio": True,
        },
        "mode": "incremental",
        "bitmapName": C2,
        "exportName": VOL,
        "dirtyBitmapContext": "qemu:dirty-bitmap:x",
        "sinceBitmapName": C1,
        "reason": None,
        "size": 1 << 26,
        "changedBytes": changed,
        "bitmapBase64": "",
        "target": "/s.qcow2",
        "scratchNodeName": "s",
        "metadata": "{}",
    }
    return {"volumeCbtBackupInfos": [info]}


def test_status_reads_the_last_enables_changed_bytes_until_its_job_expires(
    tmp_path: Path,
) -> None:
    s = _store(tmp_path)
    s.create_job("j1", "EnableCbtTask", TASK)
    s.finish_job("j1", result=_enable_result(65536))
    s.create_job("j2", "EnableCbtTask", TASK)
    s.finish_job("j2", result=_enable_result(131072))
    s.create_job("j3", "EnableCbtTask", TASK)
    s.finish_job("j3", error={"code": "SYS.1006"})  # a failed one does not count
    [row] = status.summaries(s)
    assert row.last_enable is not None and row.last_enable.job_uuid == "j2"
    out = status.to_json(row)
    assert out["changedBytes"] == 131072 and out["disks"] == 1 and out["volumes"] == [VOL]
    assert out["lastTransition"]["to"] == "Created"
    header, line = status.lines([row])
    assert header.split()[:3] == ["TASK", "VM", "STATUS"] and "128 KiB" in line
    s.expire_jobs(datetime(2100, 1, 1, tzinfo=UTC))
    [row] = status.summaries(s)
    assert status.to_json(row)["changedBytes"] is None
    assert "  -  " in status.lines([row])[1]
    s.close()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[api]\nlisten = "127.0.0.1:1"\ntokens = ["test-token-0123456789abcdef"]\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n'
    )
    path.chmod(0o600)  # it holds a token
    return path


def test_the_state_directory_lock_tells_a_running_agent(tmp_path: Path) -> None:
    config = parse_config(
        {
            "api": {"tokens": ["test-token-0123456789abcdef"]},
            "state": {"dir": str(tmp_path / "state")},
        },
        tmp_path,
    )
    assert lock_holder(config) is None
    with serving(config):
        assert lock_holder(config) is not None
        with pytest.raises(OperationError, match="another cbt-agent serves"), serving(config):
            pass
    assert lock_holder(config) is None


def test_status_json_and_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path)
    (tmp_path / "state").mkdir()
    _store(tmp_path / "state").close()
    assert main(["status", "-c", str(config), "--json"]) == 0
    [t] = json.loads(capsys.readouterr().out)["tasks"]
    assert (t["uuid"], t["changedBytes"], t["latestCheckpoint"]) == (TASK, None, None)
    assert main(["sweep", "-c", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config file not found" in err


def test_the_operator_commands_stay_below_the_api() -> None:
    """ops/ reads the engine's rules and the store, never the HTTP layer."""
    from test_layers import PACKAGE, imported_modules

    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        assert not [m for m in imported_modules(path) if m.startswith("cbt_agent.api")], path
