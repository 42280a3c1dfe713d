"""The backup client's pure rules: the manifest and its chains (cbt_agent.client.chain), and
which ranges are copied in which requests (cbt_agent.client.extents)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest

from cbt_agent.client import chain, extents
from cbt_agent.client.chain import (
    CheckpointBackup,
    DiskBackup,
    Manifest,
    chain_of,
    find_checkpoint,
    next_bitmap_name,
    plan_target,
    with_checkpoint,
)
from cbt_agent.client.errors import BackupError, ManifestError, UnknownCheckpoint
from cbt_agent.client.progress import Progress

G = 65536
A, B = "a" * 32, "b" * 32
VM, TASK = "e" * 32, "0123456789ab" + "f" * 20
# checkpoint names as the agent cuts them (model.checkpoint_name): the only ones a manifest holds
CP1, CP2, CP3, CP4, CP9 = (f"cbt-{TASK[:12]}-{n:06d}" for n in (1, 2, 3, 4, 9))


def disk(vol: str, cp: str, backing: DiskBackup | None = None, reason: str = "first") -> DiskBackup:
    mode = chain.INCREMENTAL if backing else chain.FULL
    return DiskBackup(
        volume_uuid=vol,
        file=chain.disk_file_name(vol, cp, mode),
        backing_file=backing.file if backing else None,
        mode=mode,
        size=8 * G,
        granularity=G,
        copied_bytes=G,
        sha256="0" * 64,
        reason=None if backing else reason,
        since=None,
    )


def checkpoint(name: str, *disks: DiskBackup) -> CheckpointBackup:
    return CheckpointBackup(name, chain.checkpoint_mode(disks), "2026-01-01T00:00:00+00:00", disks)


def three_checkpoints() -> Manifest:
    """CP1: A full; CP2: A incremental, B added (full); CP3: both incremental."""
    a1 = disk(A, CP1)
    a2, b2 = disk(A, CP2, a1), disk(B, CP2, reason=f"disk was added after checkpoint {CP1}")
    a3, b3 = disk(A, CP3, a2), disk(B, CP3, b2)
    m = Manifest(vm_uuid=VM)
    for cp in (checkpoint(CP1, a1), checkpoint(CP2, a2, b2), checkpoint(CP3, a3, b3)):
        m = with_checkpoint(m, cp, TASK)
    return m


def test_next_bitmap_name_is_the_latest_completed_checkpoint() -> None:
    assert next_bitmap_name(Manifest(vm_uuid=VM)) is None
    assert next_bitmap_name(three_checkpoints()) == CP3


def test_chains_are_per_disk_and_a_new_disk_starts_its_own() -> None:
    m = three_checkpoints()
    assert [d.file for d in chain_of(m, CP3, A)] == [
        chain.disk_file_name(A, CP1, chain.FULL),
        chain.disk_file_name(A, CP2, chain.INCREMENTAL),
        chain.disk_file_name(A, CP3, chain.INCREMENTAL),
    ]
    assert [d.mode for d in chain_of(m, CP3, B)] == ["full", "incremental"]
    assert [d.mode for d in chain_of(m, None, B)] == ["full", "incremental"]
    assert len(chain_of(m, CP1, A)) == 1
    assert m.checkpoints[1].mode == chain.MIXED
    with pytest.raises(ManifestError, match=f"disk {B} is not in checkpoint {CP1}"):
        chain_of(m, CP1, B)


def test_unknown_checkpoint_names_the_known_ones() -> None:
    with pytest.raises(
        UnknownCheckpoint, match=rf"'nope' is not in this backup \(known: {CP1}, {CP2}, {CP3}\)"
    ):
        find_checkpoint(three_checkpoints(), "nope")
    with pytest.raises(UnknownCheckpoint, match="no checkpoint yet"):
        find_checkpoint(Manifest(vm_uuid=VM), None)


def test_plan_target_stacks_an_incremental_on_the_disks_file_at_since() -> None:
    m = three_checkpoints()
    t = plan_target(m, CP4, A, "incremental", CP2, None)
    assert (t.mode, t.backing, t.file) == (
        "incremental",
        m.checkpoints[1].disk(A),
        f"{A}.{CP4}.inc.qcow2",
    )
    full = plan_target(m, CP4, B, "full", None, "bitmap lost")
    assert (full.mode, full.backing, full.reason, full.file) == (
        "full",
        None,
        "bitmap lost",
        f"{B}.{CP4}.full.qcow2",
    )


def test_incremental_without_a_local_base_is_copied_in_full_never_on_a_wrong_base() -> None:
    m = three_checkpoints()
    t = plan_target(m, CP4, B, "incremental", CP1, None)  # B has no file at CP1
    assert (t.mode, t.backing) == ("full", None)
    assert t.reason == f"no file of this disk at checkpoint {CP1} in the backup directory"
    assert plan_target(Manifest(vm_uuid=VM), CP9, A, "incremental", None, None).mode == "full"


def test_manifest_round_trips_through_json() -> None:
    m = three_checkpoints()
    doc = json.loads(json.dumps(m.to_dict()))
    assert doc["checkpoints"][1]["disks"][1]["reason"] == f"disk was added after checkpoint {CP1}"
    assert doc["checkpoints"][2]["disks"][0]["backingFile"] == f"{A}.{CP2}.inc.qcow2"
    assert Manifest.from_dict(doc) == m


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(formatVersion=7), "formatVersion"),
        (lambda d: d["checkpoints"][0].pop("name"), r"checkpoints\[0\].name"),
        (lambda d: d["checkpoints"][1]["disks"][0].update(copiedBytes=-1), "copiedBytes"),
        (lambda d: d["checkpoints"][1]["disks"][0].update(backingFile=None), "backing"),
        (lambda d: d["checkpoints"][1]["disks"][0].update(backingFile="x.qcow2"), "x.qcow2"),
        (lambda d: d["checkpoints"][0]["disks"][0].update(file="../evil"), "plain file name"),
        (lambda d: d["checkpoints"][2].update(name=CP1), f"{CP1} appears twice"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_field(edit: object, message: str) -> None:
    doc = three_checkpoints().to_dict()
    edit(doc)  # type: ignore[operator]
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(doc)


def test_with_checkpoint_refuses_a_repeated_name_or_file() -> None:
    m = three_checkpoints()
    with pytest.raises(ManifestError, match=f"{CP3} appears twice"):
        with_checkpoint(m, checkpoint(CP3, disk(A, CP9)), None)
    with pytest.raises(ManifestError, match="appears twice"):
        with_checkpoint(m, checkpoint(CP4, disk(A, CP1)), None)


# ---- extents ----------------------------------------------------------------------------------


def test_ranges_widen_to_whole_clusters_merge_and_clip_at_the_end() -> None:
    size = 10 * G + 1000  # the last cluster is partial
    runs = extents.cluster_runs(
        [(5 * G - 1, 2), (100, 10), (G, 1), (9 * G + 5, 2 * G), (20 * G, G), (3 * G, 0)], G, size
    )
    assert runs == [(0, 2 * G), (4 * G, 2 * G), (9 * G, G + 1000)]
    assert extents.total(runs) == 5 * G + 1000


def test_requests_use_few_sizes_and_cover_every_run_exactly() -> None:
    runs = [(0, 23 * G), (40 * G, 3 * G + 17)]
    reqs = list(extents.requests(runs, G, 16 * G))
    assert reqs == [
        (0, 16 * G),
        (16 * G, 4 * G),
        (20 * G, 2 * G),
        (22 * G, G),
        (40 * G, 2 * G),
        (42 * G, G),
        (43 * G, 17),
    ]
    many = [(i * 100 * G, n * G) for i, n in enumerate(range(1, 60))]
    sizes = {n for _, n in extents.requests(many, G, 16 * G)}
    assert sizes <= {G, 2 * G, 4 * G, 8 * G, 16 * G}


def test_bitmap_base64_decodes_lsb_first() -> None:
    bits = bytes([0b1000_0011, 0b0000_0001])  # clusters 0, 1, 7, 8
    assert extents.bitmap_runs(base64.b64encode(bits).decode(), G, 16 * G) == [
        (0, 2 * G),
        (7 * G, 2 * G),
    ]


def test_granularity_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        extents.cluster_runs([(0, 1)], 3000, 10_000)


# ---- progress ---------------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    p = Progress(quiet)
    p.start("disk aaaa full", 4 << 20)
    p.add(1 << 20)
    p.finish()
    assert quiet.getvalue() == ""
    tty = Tty()
    p = Progress(tty, interval=0)
    p.start("disk aaaa full", 4 << 20)
    p.add(1 << 20)
    p.finish()
    assert "disk aaaa full:       1.0 / 4.0 MiB ( 25.0 %)" in tty.getvalue()
    assert tty.getvalue().endswith("\n")


def test_progress_rate_eta_and_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    import cbt_agent.client.progress as progress_module

    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    tty = Tty()
    p = Progress(tty, interval=0)
    p.start("disk aaaa full", 100 << 20)
    now[0] += 2.0
    p.add(20 << 20)  # 10 MiB/s: 80 MiB left take 8 s
    assert p.line().endswith("( 20.0 %)     10.0 MiB/s  ETA 0:08")
    now[0] += 8.0
    p.set(100 << 20)
    assert p.line().endswith("(100.0 %)     10.0 MiB/s  in 0:10")
    quiet = Tty()
    q = Progress(quiet, interval=0, quiet=True)  # --quiet, even on a terminal
    q.start("disk aaaa full", 4 << 20)
    q.add(1 << 20)
    q.finish()
    assert quiet.getvalue() == ""


def test_split_zero_reads_only_what_is_not_zero() -> None:
    from cbt_agent.client.extents import split_zero

    g = 64 * 1024
    runs = [(0, 4 * g), (10 * g, 2 * g), (20 * g, g)]
    # zero: clusters 1-2 wholly, half of cluster 10 (not whole: read), 20-30
    zero = [(g, 2 * g), (10 * g + g // 2, g // 2), (20 * g, 10 * g)]
    data, zeroed = split_zero(runs, zero, g)
    assert data == [(0, g), (3 * g, g), (10 * g, 2 * g)]
    assert zeroed == [(g, 2 * g), (20 * g, g)]
    assert split_zero(runs, [], g) == (runs, [])
    assert split_zero([], zero, g) == ([], [])


def test_restore_progress_follows_qemu_img(tmp_path: Path) -> None:
    """`qemu-img convert -p` percentages drive the restore's progress line to 100 %."""
    import shutil
    import subprocess

    import stack

    from cbt_agent.client.restore import convert_with_progress

    if shutil.which("qemu-img") is None:
        stack.unavailable("qemu-img (Debian package qemu-utils)")
    src = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "8M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(src)],
        check=True,
        capture_output=True,
    )
    tty = Tty()
    p = Progress(tty, interval=0)
    p.start("disk aaaa", 8 << 20)
    convert_with_progress(src, tmp_path / "out.qcow2", p)
    p.finish()
    assert p.done == 8 << 20
    assert "disk aaaa:       8.0 / 8.0 MiB (100.0 %)" in tty.getvalue()
    out = subprocess.run(
        ["qemu-img", "compare", str(src), str(tmp_path / "out.qcow2")], capture_output=True
    )
    assert out.returncode == 0, out
    with pytest.raises(BackupError, match=r"qemu-img convert failed: .*nope"):
        convert_with_progress(tmp_path / "nope", tmp_path / "x.qcow2", p)


def test_gaps_are_what_a_backup_never_reads() -> None:
    # the client trims these on the agent's export before it copies: they cost no scratch
    g = 65536
    assert extents.gaps([], 4 * g) == [(0, 4 * g)]
    assert extents.gaps([(0, 4 * g)], 4 * g) == []
    assert extents.gaps([(g, g), (3 * g, g)], 5 * g + 100) == [(0, g), (2 * g, g), (4 * g, g + 100)]
    # cut into requests as a trim takes them, the tail past the last whole cluster included
    assert list(extents.requests(extents.gaps([(0, g)], 4 * g + 100), g, 1 << 30)) == [
        (g, 2 * g),
        (3 * g, g),
        (4 * g, 100),
    ]
