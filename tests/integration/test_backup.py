"""The reference backup client against the real agent process and real VMs: `cbt-agent backup`,
`restore` and `verify` as a user runs them, checked against an in-memory model of every disk.

Each test starts its own agent (stopped by pid) and its own VM (destroyed by vm_factory)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import TOKEN, AgentProcess

pytestmark = pytest.mark.stack

G = 64 * 1024  # the agent's bitmap granularity = the backup files' cluster size
MIB = 1 << 20
PORT_RANGE = "11800:11899"
PAUSE_ENV = "CBT_CLIENT_TEST_PAUSE_AFTER_EXTENTS"


# ---- harness ----------------------------------------------------------------------------------


@pytest.fixture
async def agent(agent_process: Callable[..., AgentProcess]) -> AgentProcess:
    proc = agent_process(PORT_RANGE)
    await proc.start()
    return proc


@dataclass
class Result:
    code: int
    out: str
    err: str


CLI_TIMEOUT = 120.0


async def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    """`cbt-agent ARGS`, the agent's token in $CBT_AGENT_TOKEN (never on the command line)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CBT_AGENT_TOKEN": TOKEN, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def backup_args(agent: AgentProcess, vm: stack.TestVm, dest: Path) -> list[str]:
    return [
        "backup",
        "--url",
        agent.base,
        "--vm",
        vm.vm_uuid,
        "--dest",
        str(dest),
    ]


async def backup(agent: AgentProcess, vm: stack.TestVm, dest: Path) -> dict[str, Any]:
    """Run `cbt-agent backup`; returns the manifest's new checkpoint."""
    r = await cli(*backup_args(agent, vm, dest))
    assert r.code == 0, f"backup failed ({r.code}):\n{r.out}\n{r.err}"
    print(r.out, end="")
    return dict(manifest(dest)["checkpoints"][-1])


def manifest(dest: Path) -> dict[str, Any]:
    return dict(json.loads((dest / "manifest.json").read_text()))


async def restored_hashes(dest: Path, checkpoint: str, out: Path) -> dict[str, str]:
    """`cbt-agent restore --checkpoint`, then sha256 of each image's raw content."""
    r = await cli("restore", "--dest", str(dest), "--checkpoint", checkpoint, "--out", str(out))
    assert r.code == 0, f"restore of {checkpoint} failed:\n{r.out}\n{r.err}"
    hashes = {}
    for image in sorted(await asyncio.to_thread(lambda: list(out.glob("*.qcow2")))):
        raw = image.with_suffix(".raw")
        await run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image), str(raw))
        hashes[image.stem] = await asyncio.to_thread(sha256_file, raw)
        raw.unlink()
        image.unlink()
    return hashes


async def first_difference(image: Path, expected: bytes) -> str:
    raw = image.with_suffix(".raw")
    await run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    got = raw.read_bytes()
    raw.unlink()
    if len(got) != len(expected):
        return f"size {len(got)} != {len(expected)}"
    for off in range(0, len(got), G):
        if got[off : off + G] != expected[off : off + G]:
            i = next(i for i in range(G) if got[off + i] != expected[off + i])
            return f"first difference at byte {off + i} (cluster {off // G})"
    return "no difference"


async def run(*cmd: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _out, err = await proc.communicate()
    assert proc.returncode == 0, f"{cmd}: {err.decode()}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class DiskModel:
    """What the disk must contain, and which clusters changed since the last backup."""

    volume_uuid: str
    data: bytearray
    touched: set[int] = field(default_factory=set)

    def _mark(self, offset: int, length: int) -> None:
        self.touched.update(range(offset // G, (offset + length - 1) // G + 1))

    async def write(self, vm: stack.TestVm, offset: int, length: int, byte: int) -> None:
        await vm.write(self.volume_uuid, offset, length, byte)
        self.data[offset : offset + length] = bytes([byte]) * length
        self._mark(offset, length)

    async def write_zeroes(self, vm: stack.TestVm, offset: int, length: int, unmap: bool) -> None:
        await vm.write_zeroes(self.volume_uuid, offset, length, unmap)
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length)

    def changed_bytes(self) -> int:
        size = len(self.data)
        return sum(min(G, size - c * G) for c in self.touched)

    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def models_of(vm: stack.TestVm) -> list[DiskModel]:
    return [DiskModel(v.volume_uuid, bytearray(v.size)) for v in vm.volumes]


def checkpoint_disks(cp: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["volumeUuid"]: d for d in cp["disks"]}


def processes_using(path: Path) -> list[int]:
    """Pids whose command line mentions `path` (a qemu-nbd left behind would)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


async def wait_no_process_using(path: Path) -> None:
    deadline = time.monotonic() + 10
    while pids := processes_using(path):
        if time.monotonic() > deadline:
            for pid in pids:  # started (indirectly) by this test: stop them by pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"processes {pids} still use {path}")
        await asyncio.sleep(0.05)


async def random_writes(
    rng: random.Random, vm: stack.TestVm, models: list[DiskModel], count: int
) -> None:
    """Writes of 512 B to 4 MiB at unaligned offsets, some on the same spot, some zeroes."""
    recent: list[tuple[DiskModel, int]] = []
    for _ in range(count):
        if recent and rng.random() < 0.25:  # rewrite (around) a spot written before
            disk, near = rng.choice(recent)
            length = rng.randint(512, 256 * 1024)
            offset = max(0, min(len(disk.data) - length, near + rng.randint(-8192, 8192)))
        else:
            disk = rng.choice(models)
            length = min(int(2 ** rng.uniform(9, 22)), len(disk.data) // 2)
            offset = rng.randrange(0, len(disk.data) - length)
        if rng.random() < 0.2:
            await disk.write_zeroes(vm, offset, length, unmap=rng.random() < 0.5)
        else:
            await disk.write(vm, offset, length, rng.randint(1, 255))
        recent.append((disk, offset))


async def assert_task_stopped(agent: AgentProcess, vm: stack.TestVm) -> None:
    """The client disabled the task after its backup: no export is left in QEMU."""
    url = f"{agent.base}/zstack/v1/cbt-task"
    async with agent.session.get(url, params={"q": f"resourceRefs.resourceUuid={vm.vm_uuid}"}) as r:
        tasks = (await r.json())["inventories"]
    assert [t["status"] for t in tasks] == ["Stopped"]
    assert await vm.qmp_async("query-block-exports") == []


def part_files(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.endswith(".part"))


async def paused_backup(
    agent: AgentProcess, vm: stack.TestVm, dest: Path, after: int, sig: int
) -> tuple[int, list[str], str]:
    """Start a backup that pauses after `after` extents, send it `sig` once it says so.
    Returns its exit code, the .part files present at the pause, and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cbt_agent",
        *backup_args(agent, vm, dest),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CBT_AGENT_TOKEN": TOKEN, PAUSE_ENV: str(after)},
    )
    assert proc.stderr is not None
    lines = []
    try:
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
            assert line, f"the backup ended without pausing: {lines}"
            lines.append(line)
            if f"paused after {after} extents" in line:
                break
        parts = part_files(dest)
        os.kill(proc.pid, sig)
        rest = await asyncio.wait_for(proc.stderr.read(), 60)
        lines.append(rest.decode())
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        code = await proc.wait()
    await wait_no_process_using(dest)  # its qemu-nbd exits once its client is gone
    return code, parts, "".join(lines)


def remove_task_bitmaps(vm: stack.TestVm, volume_uuid: str) -> list[str]:
    """Lose a disk's change tracking (as a lost or damaged qcow2 bitmap would)."""
    node = vm.node_name(volume_uuid)
    names = [str(b["name"]) for b in vm.bitmaps(volume_uuid)]
    for name in names:
        vm.qmp("block-dirty-bitmap-remove", {"node": node, "name": name})
    return names


# ---- tests ------------------------------------------------------------------------------------


async def test_random_writes_six_backups_every_checkpoint_restores_exactly(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CBT_TEST_SEED", time.time_ns() % 1_000_000))
    print(f"seed {seed} (rerun with CBT_TEST_SEED={seed})")
    rng = random.Random(seed)
    vm = vm_factory(disks_mib=[64, 32, 16])
    models = models_of(vm)
    dest = tmp_path / "backup"
    lost_tracking_at = 3  # before this backup, the third disk loses its bitmaps
    expected: dict[str, dict[str, str]] = {}  # checkpoint -> volume -> sha256 of the content
    for n in range(6):
        await random_writes(rng, vm, models, rng.randint(6, 14))
        if n == lost_tracking_at:
            assert remove_task_bitmaps(vm, models[2].volume_uuid)
        cp = await backup(agent, vm, dest)
        disks = checkpoint_disks(cp)
        assert list(disks) == [m.volume_uuid for m in models]
        for i, m in enumerate(models):
            d = disks[m.volume_uuid]
            if n == 0 or (n == lost_tracking_at and i == 2):
                assert (d["mode"], d["backingFile"]) == ("full", None), d
                assert d["reason"], d
            else:
                assert d["mode"] == "incremental", d
                assert d["copiedBytes"] == m.changed_bytes(), (
                    f"backup {n}, disk {i}: copied {d['copiedBytes']}, "
                    f"{len(m.touched)} clusters touched = {m.changed_bytes()}"
                )
                previous = checkpoint_disks(manifest(dest)["checkpoints"][n - 1])[m.volume_uuid]
                assert d["backingFile"] == previous["file"]
            m.touched.clear()
        expected[cp["name"]] = {m.volume_uuid: m.digest() for m in models}
        if n == lost_tracking_at:
            assert cp["mode"] == "mixed"
        # Every checkpoint so far restores to exactly the disks as they were then.
        for name, digests in expected.items():
            out = tmp_path / f"restore-{n}-{name}"
            got = await restored_hashes(dest, name, out)
            if got != digests and name == cp["name"]:
                await cli("restore", "--dest", str(dest), "--checkpoint", name, "--out", str(out))
                diffs = [
                    f"disk {i}: {await first_difference(out / f'{m.volume_uuid}.qcow2', m.data)}"
                    for i, m in enumerate(models)
                    if got.get(m.volume_uuid) != digests[m.volume_uuid]
                ]
                pytest.fail(f"seed {seed}, checkpoint {name}: {diffs}")
            assert got == digests, f"seed {seed}: checkpoint {name} restored wrong"
    r = await cli("verify", str(dest))
    assert r.code == 0, r.out + r.err
    assert r.out.count("OK ") == 18
    await assert_task_stopped(agent, vm)


async def test_killed_backup_leaves_no_trace_and_the_next_one_has_all_changes(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[16, 8])
    models = models_of(vm)
    dest = tmp_path / "backup"
    await models[0].write(vm, 0, 3 * MIB, 0x11)
    first = await backup(agent, vm, dest)
    for m in models:
        m.touched.clear()
    snapshot1 = {m.volume_uuid: m.digest() for m in models}
    # Separate dirty runs, so the incremental needs several requests.
    for i, off in enumerate((1 * MIB, 5 * MIB + 100, 9 * MIB + 7, 13 * MIB)):
        await models[0].write(vm, off, 70_000, 0x20 + i)
    await models[1].write(vm, 3 * MIB + 5, 1000, 0x33)
    manifest_before = (dest / "manifest.json").read_bytes()
    files_before = sorted(p.name for p in dest.iterdir())

    # SIGTERM mid-copy: the client cleans up (partial file removed, task disabled), exits 143.
    code, parts, err = await paused_backup(agent, vm, dest, 1, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err
    assert sorted(p.name for p in dest.iterdir()) == files_before
    assert (dest / "manifest.json").read_bytes() == manifest_before
    await assert_task_stopped(agent, vm)

    # SIGKILL mid-copy: nothing can clean up; the next run must cope.
    code, parts, _ = await paused_backup(agent, vm, dest, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert parts, "the killed backup should be mid-copy into a .part file"

    assert (dest / "manifest.json").read_bytes() == manifest_before
    finals = sorted(p.name for p in dest.iterdir() if not p.name.endswith(".part"))
    assert finals == files_before, "no partial file may carry a final name"
    r = await cli("verify", str(dest))
    assert r.code != 0 and "LEFTOVER" in r.out and parts[0] in r.out

    # The task is still Running (its client died): the next backup disables it, asks for the
    # changes since the last GOOD checkpoint, and so gets the writes from before and after.
    await models[1].write(vm, 6 * MIB, 4096, 0x44)
    await models[0].write(vm, 2 * MIB + 3, 10, 0x55)
    r = await cli(*backup_args(agent, vm, dest))
    assert r.code == 0, r.out + r.err
    assert "disabling it (force)" in r.err and "removed" in r.err
    doc = manifest(dest)
    assert [c["name"] for c in doc["checkpoints"]] == [first["name"], r.out.split()[1]]
    disks = checkpoint_disks(doc["checkpoints"][1])
    for m in models:
        d = disks[m.volume_uuid]
        assert d["mode"] == "incremental" and d["sinceCheckpoint"] == first["name"]
        assert d["copiedBytes"] == m.changed_bytes()
    assert not part_files(dest)
    assert await restored_hashes(dest, doc["checkpoints"][1]["name"], tmp_path / "r2") == {
        m.volume_uuid: m.digest() for m in models
    }
    assert await restored_hashes(dest, first["name"], tmp_path / "r1") == snapshot1
    r = await cli("verify", str(dest))
    assert r.code == 0, r.out + r.err
    await assert_task_stopped(agent, vm)


async def test_verify_flags_corruption_and_unknown_files_restore_refuses_unknown_checkpoint(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[8])
    vol = vm.volumes[0].volume_uuid
    dest = tmp_path / "backup"
    await vm.write(vol, 4096, 200_000, 0x61)
    await backup(agent, vm, dest)
    await vm.write(vol, 1 * MIB, 5000, 0x62)
    second = await backup(agent, vm, dest)

    r = await cli("verify", str(dest))
    assert r.code == 0, r.out + r.err
    lines = r.out.splitlines()
    assert len(lines) == 2 and all(line.startswith("OK ") for line in lines)

    r = await cli(
        "restore", "--dest", str(dest), "--checkpoint", "cbt-nope", "--out", str(tmp_path / "o")
    )
    assert r.code != 0
    assert "checkpoint 'cbt-nope' is not in this backup" in r.err
    assert "Traceback" not in r.err and not (tmp_path / "o").exists()

    # One flipped byte in the incremental: verify names it, restore refuses it.
    victim = dest / second["disks"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = await cli("verify", str(dest))
    assert r.code != 0
    assert f"CORRUPT  {victim.name}" in r.out and victim.name in r.err
    r = await cli("restore", "--dest", str(dest), "--out", str(tmp_path / "o"))
    assert r.code != 0 and victim.name in r.err

    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (dest / "stray.qcow2").write_bytes(b"x")
    r = await cli("verify", str(dest))
    assert r.code != 0 and "UNKNOWN  stray.qcow2" in r.out and "stray.qcow2" in r.err


async def test_a_failed_backup_says_why_and_changes_nothing(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    vm = vm_factory(disks_mib=[8])
    dest = tmp_path / "backup"
    await vm.write(vm.volumes[0].volume_uuid, 0, 4096, 0x71)
    await backup(agent, vm, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    await vm.write(vm.volumes[0].volume_uuid, 0, 4096, 0x72)

    args = backup_args(agent, vm, dest)
    r = await cli(*args, env={"CBT_AGENT_TOKEN": "wrong-token"})
    assert r.code == 1 and "[ID.1001]" in r.err and "Traceback" not in r.err, r.err
    # A second directory of the same VM is independent: the agent offers an incremental since
    # its latest checkpoint, which that directory lacks, so the client copies the disk in full.
    r = await cli(*backup_args(agent, vm, tmp_path / "other"))
    assert r.code == 0, r.err
    (other,) = manifest(tmp_path / "other")["checkpoints"][0]["disks"]
    assert (other["mode"], other["backingFile"]) == ("full", None)
    assert other["reason"].startswith("no file of this disk at checkpoint cbt-")
    r = await cli("backup", "--url", agent.base, "--vm", "f" * 32, "--dest", str(dest))
    assert r.code == 1 and f"holds backups of VM {vm.vm_uuid}" in r.err

    # A shut-off VM is backed up through an offline export (see the next test); one whose
    # image cannot be opened fails, saying why, and changes nothing.
    vm.shutdown()
    image = vm.volumes[0].path
    image.rename(image.with_suffix(".away"))
    try:
        r = await cli(*args)
    finally:
        image.with_suffix(".away").rename(image)
    assert r.code == 1 and "ExportNbdVolumes failed" in r.err and str(image) in r.err, r.err
    assert "Traceback" not in r.err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before


async def test_backup_of_a_shut_off_vm_is_an_offline_export_and_restores_exactly(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    """The client backs a shut-off VM up through ExportNbdVolumes by itself: incremental since
    the last backup, exact; the VM starts afterwards and the next (running) backup holds only
    what was written since; every checkpoint restores byte for byte."""
    from offlinehelp import daemons_of

    rng = random.Random(7)
    vm = vm_factory(disks_mib=[16, 8])
    models = models_of(vm)
    dest = tmp_path / "backup"
    expected: dict[str, dict[str, str]] = {}
    modes = []
    for n in range(4):
        offline = n in (1, 2)  # two offline backups in a row: the second one holds nothing
        if n == 3:
            vm.start()  # the last backup unexported: the images are free
        if n != 2:
            await random_writes(rng, vm, models, 6)
        if n == 1:
            vm.shutdown()
        r = await cli(*backup_args(agent, vm, dest))
        assert r.code == 0, f"backup {n} failed:\n{r.out}\n{r.err}"
        assert ("exporting its disks offline" in r.err) == offline, r.err
        cp = dict(manifest(dest)["checkpoints"][-1])
        modes.append(cp["mode"])
        for m in models:
            d = checkpoint_disks(cp)[m.volume_uuid]
            if n > 0:
                assert d["copiedBytes"] == m.changed_bytes(), (n, d)
            m.touched.clear()
        expected[cp["name"]] = {m.volume_uuid: m.digest() for m in models}
        assert daemons_of(tmp_path / "state") == {}  # unexported: no daemon holds the images
        await assert_task_stopped_offline(agent, vm)
    assert modes == ["full", "incremental", "incremental", "incremental"]
    for name, digests in expected.items():
        got = await restored_hashes(dest, name, tmp_path / f"restore-{name}")
        assert got == digests, f"checkpoint {name} restored wrong"
    r = await cli("verify", str(dest))
    assert r.code == 0, r.out + r.err


async def assert_task_stopped_offline(agent: AgentProcess, vm: stack.TestVm) -> None:
    url = f"{agent.base}/zstack/v1/cbt-task"
    async with agent.session.get(url, params={"q": f"resourceRefs.resourceUuid={vm.vm_uuid}"}) as r:
        tasks = (await r.json())["inventories"]
    assert [t["status"] for t in tasks] == ["Stopped"]


async def test_a_disk_whose_serial_is_not_a_volume_uuid_is_refused_at_create_and_enable(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    """The agent names volumes (and its scratch files) by the disk's <serial>: a serial that is
    not a volume uuid fails Create and Enable with an error naming the disk, nothing made."""
    odd = tmp_path / "odd.qcow2"
    await run("qemu-img", "create", "-q", "-f", "qcow2", str(odd), "8M")
    disk_xml = (
        "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{odd}'/><target dev='vdb' bus='virtio'/>"
        "<serial>not-a-volume-uuid</serial></disk>"
    )
    said = f"disk vdb ({odd}) has <serial> 'not-a-volume-uuid', which is not a volume uuid"

    # Enable: the task exists (one good backup), then the odd disk is hot-plugged
    vm = vm_factory(disks_mib=[8])
    dest = tmp_path / "backup"
    await backup(agent, vm, dest)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    live_and_config = 3  # VIR_DOMAIN_AFFECT_LIVE | VIR_DOMAIN_AFFECT_CONFIG
    await asyncio.to_thread(vm.domain().attachDeviceFlags, disk_xml, live_and_config)
    r = await cli(*backup_args(agent, vm, dest))
    assert r.code == 1 and "EnableCbtTask failed" in r.err and said in r.err, r.err
    assert "Traceback" not in r.err
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    scratch = agent.config.parent / "state"
    assert not [p for p in scratch.rglob("*") if "not-a-volume-uuid" in p.name]

    # Create: a VM defined with the odd disk gets no task
    other = vm_factory(disks_mib=[8], start=False)
    config_only = 2  # VIR_DOMAIN_AFFECT_CONFIG
    await asyncio.to_thread(other.domain().attachDeviceFlags, disk_xml, config_only)
    r = await cli(*backup_args(agent, other, tmp_path / "other"))
    assert r.code == 1 and "CreateCbtTask failed" in r.err and said in r.err, r.err
    assert not (tmp_path / "other").exists()


async def test_an_unchanged_disk_is_an_empty_incremental_that_restores_exactly(
    vm_factory: Callable[..., stack.TestVm], agent: AgentProcess, tmp_path: Path
) -> None:
    """A disk with nothing dirty since the last backup gets an incremental of no clusters,
    written without opening its export; it restores to exactly the disk, beside a changed one
    in the same checkpoint and alone in the next."""
    vm = vm_factory(disks_mib=[16, 8])
    models = models_of(vm)
    dest = tmp_path / "backup"
    await models[1].write(vm, 2 * MIB, 3 * MIB, 0x61)
    first = await backup(agent, vm, dest)
    for m in models:
        m.touched.clear()
    await models[0].write(vm, 5 * MIB + 17, 200_000, 0x62)  # only the first disk changes
    second = await backup(agent, vm, dest)
    third = await backup(agent, vm, dest)  # nothing changed anywhere
    expected_copied = [(models[0].changed_bytes(), 0), (0, 0)]
    assert models[0].changed_bytes() == 4 * G  # 200,000 bytes from 5 MiB + 17: 4 clusters
    for cp, copied in zip((second, third), expected_copied, strict=True):
        disks = checkpoint_disks(cp)
        assert [disks[m.volume_uuid]["copiedBytes"] for m in models] == list(copied), cp
        for m in models:
            d = disks[m.volume_uuid]
            assert d["mode"] == "incremental" and (dest / d["file"]).is_file(), d
    prev = checkpoint_disks(second)
    for m in models:
        assert checkpoint_disks(third)[m.volume_uuid]["backingFile"] == prev[m.volume_uuid]["file"]
    now = {m.volume_uuid: m.digest() for m in models}
    assert await restored_hashes(dest, third["name"], tmp_path / "r3") == now
    assert await restored_hashes(dest, second["name"], tmp_path / "r2") == now
    assert first["name"] != second["name"] != third["name"]
    r = await cli("verify", str(dest))
    assert r.code == 0, r.out + r.err
