"""Seeded, model-based hunt for lost changes: random guest writes, image-chain operations (live
snapshots, commits, streams, copies, offline snapshots), clean and unclean stops of QEMU and of
the agent, interleaved with backups by the reference client and direct Enables, against a pure
in-test model of every disk's bytes.

The agent runs as a real process (started and stopped by pid), driven over its HTTP API; the VM
has 2-3 small disks. Seeds: 1, 2, 3 by default, 1..N with CBT_FUZZ_SEEDS=N (CBT_FUZZ_STEPS sets
the steps per seed). Every assertion message carries the seed and the step log.

The rule checked on every Enable (direct, or the one `cbt-agent backup` makes), per disk, with
base = the reply's `sinceBitmapName` (must be the asked `bitmapName`, or the latest checkpoint
handed out when none was asked):

- `incremental`: the dirty set (clusters set in `bitmapBase64`; for a backup, the clusters the
  incremental file holds) must CONTAIN every cluster written since the base checkpoint was cut,
  and must hold NO cluster outside (clusters written since the base) UNION (clusters touched by
  chain operations since the base). A stream, an active or inactive commit and a copy touch
  every cluster of the disk; a live snapshot touches none. After a QEMU SIGKILL an
  incremental on an older base is wrong outright, whatever its dirty set (the bitmaps are
  inconsistent or gone). After an offline qemu-img snapshot an incremental is held to the
  rule above and printed: it can be exact (a later commit of the untracked overlay into the
  tracked node marks every cluster the overlay held), or miss the overlay's writes.
- `full`: always needs a non-empty `reason`. It is expected when the model says tracking may be
  lost: no base (first Enable), QEMU SIGKILL or offline snapshot since the base, a base unknown
  to the agent or beyond retention. A full where the model says the increment should be exact
  is allowed but printed (and reported as a warning), with the agent's reason.

After every backup, every checkpoint of the backup directory is restored (`cbt-agent restore`)
and each disk must equal the model's bytes as of that checkpoint, byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shutil
import signal
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import chainops
import pytest
import stack
from agentproc import TOKEN, AgentProcess

pytestmark = pytest.mark.stack

MIB = 1 << 20
PORT_RANGE = "12100:12199"
KEEP = 5  # [checkpoints] keep: small, so old bases fall out of retention
STEPS = int(os.environ.get("CBT_FUZZ_STEPS", "24"))
REPO = Path(__file__).resolve().parents[2]


def seeds(spec: str) -> list[int]:
    """CBT_FUZZ_SEEDS: N runs seeds 1..N; also a list of seeds and ranges, e.g. "7,10-12"."""
    spec = spec.strip()
    if spec.isdigit():
        return list(range(1, int(spec) + 1))
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        out += range(int(first), int(last or first) + 1)
    return list(dict.fromkeys(out))


SEEDS = seeds(os.environ.get("CBT_FUZZ_SEEDS", "3"))
CLI_TIMEOUT = 120.0
QEMU_KILLED = "QEMU SIGKILL"
OFFLINE_SNAPSHOT = "offline qemu-img snapshot"


class FuzzNote(UserWarning):
    """Allowed but worth a look: a full where the model expected an exact incremental, an
    incremental after an offline snapshot."""


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def agent(agent_process: Callable[..., AgentProcess]) -> AgentProcess:
    return agent_process(PORT_RANGE, extra=f"[checkpoints]\nkeep = {KEEP}\n")


@dataclass
class ChainVms:
    make: Callable[[list[int]], stack.TestVm]
    overlay_dir: Path


@pytest.fixture
def chain_vms(vm_factory: Callable[..., stack.TestVm], tmp_path: Path) -> Iterator[ChainVms]:
    """VMs from vm_factory plus a directory for the overlays and copies the chain operations
    make; at teardown the VMs are destroyed first, then that directory is removed (TestVm's
    destroy removes only the original volumes)."""
    made: list[stack.TestVm] = []
    overlay_dir = tmp_path / "chain"

    def make(disks_mib: list[int]) -> stack.TestVm:
        vm = vm_factory(disks_mib=disks_mib)
        made.append(vm)
        return vm

    yield ChainVms(make, overlay_dir)
    errors = stack.destroy_all(made)
    shutil.rmtree(overlay_dir, ignore_errors=True)
    if errors:
        raise errors[0]


# ---- the model --------------------------------------------------------------------------------


@dataclass
class Since:
    """What happened to one disk since one checkpoint was cut."""

    written: set[int] = field(default_factory=set)  # clusters written by the guest
    touched: set[int] = field(default_factory=set)  # clusters a chain operation may have marked
    lost: list[str] = field(default_factory=list)  # events after which tracking may be gone


@dataclass
class DiskModel:
    volume_uuid: str
    name: str  # d0, d1, ... in the step log
    data: bytearray
    granularity: int = 65536

    @property
    def clusters(self) -> int:
        return -(-len(self.data) // self.granularity)

    def bytes_of(self, clusters: Iterable[int]) -> int:
        g = self.granularity
        return sum(min(g, len(self.data) - c * g) for c in clusters)

    def span(self, offset: int, length: int) -> set[int]:
        return set(range(offset // self.granularity, (offset + length - 1) // self.granularity + 1))


@dataclass
class Model:
    disks: list[DiskModel]
    since: dict[str, dict[str, Since]] = field(default_factory=dict)  # checkpoint -> volume ->
    order: list[str] = field(default_factory=list)  # checkpoints handed out, oldest first
    images: dict[str, dict[str, bytes]] = field(default_factory=dict)  # backup cp -> zlib bytes
    recent: list[tuple[DiskModel, int]] = field(default_factory=list)  # (disk, offset) written

    def disk(self, volume_uuid: str) -> DiskModel:
        return next(d for d in self.disks if d.volume_uuid == volume_uuid)

    def wrote(self, disk: DiskModel, offset: int, length: int, byte: int) -> None:
        disk.data[offset : offset + length] = bytes([byte]) * length
        span = disk.span(offset, length)
        for per_disk in self.since.values():
            per_disk[disk.volume_uuid].written |= span
        self.recent = [*self.recent[-15:], (disk, offset)]

    def chain_op(self, disk: DiskModel) -> None:
        for per_disk in self.since.values():
            per_disk[disk.volume_uuid].touched = set(range(disk.clusters))

    def lose(self, disks: Iterable[DiskModel], why: str) -> None:
        for per_disk in self.since.values():
            for d in disks:
                per_disk[d.volume_uuid].lost.append(why)

    def cut(self, name: str) -> None:
        self.since[name] = {d.volume_uuid: Since() for d in self.disks}
        self.order.append(name)

    def full_expected(self, base: str | None, volume_uuid: str) -> str | None:
        """Why a full is the right answer for this disk and base (None: an incremental can be
        exact)."""
        if base is None:
            return "no base" if not self.order else None
        if base not in self.since:
            return f"base {base} was never handed out"
        if base not in self.order[-KEEP:]:
            return f"base {base} is beyond retention ({KEEP})"
        lost = self.since[base][volume_uuid].lost
        return f"since {base}: {', '.join(lost)}" if lost else None

    def keep_image(self, name: str) -> None:
        self.images[name] = {d.volume_uuid: zlib.compress(bytes(d.data), 1) for d in self.disks}


def runs(clusters: Iterable[int]) -> str:
    """Clusters as compact runs: '3-5,9'."""
    out: list[str] = []
    items = sorted(clusters)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out) or "none"


def bitmap_clusters(b64: str, clusters: int) -> set[int]:
    """`bitmapBase64`: bit i = cluster i, LSB first within each byte."""
    bits = base64.b64decode(b64)
    return {i for i in range(clusters) if i // 8 < len(bits) and bits[i // 8] >> (i % 8) & 1}


# ---- the run ----------------------------------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    exe = Path(sys.executable).with_name("cbt-agent")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cbt_agent"]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # the token never on the command line; this checkout's cbt_agent, not the one the
        # venv's `cbt-agent` was installed from (an editable install of another worktree)
        env={**os.environ, "CBT_AGENT_TOKEN": TOKEN, "PYTHONPATH": str(REPO)},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_tool(*cmd: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {err.decode().strip()}")
    return out.decode()


class Fuzz:
    def __init__(
        self,
        seed: int,
        agent: AgentProcess,
        vm: stack.TestVm,
        overlay_dir: Path,
        workdir: Path,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.agent = agent
        self.vm = vm
        self.overlay_dir = overlay_dir
        self.workdir = workdir
        self.backup_dir = workdir / "backup"
        self.model = Model(
            [DiskModel(v.volume_uuid, f"d{i}", bytearray(v.size)) for i, v in enumerate(vm.volumes)]
        )
        self.task_uuid = ""
        self.log: list[str] = []
        self.notes: list[str] = []
        self.counts: dict[str, int] = {}
        self.step_no = 0

    # -- reporting --

    def say(self, text: str) -> None:
        self.log.append(f"  {text}")

    def fail(self, text: str) -> NoReturn:
        pytest.fail(
            f"seed {self.seed} (CBT_FUZZ_SEEDS), step {self.step_no}: {text}\n"
            f"step log (seed {self.seed}):\n" + "\n".join(self.log),
            pytrace=False,
        )

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.fail(text)

    def note(self, text: str) -> None:
        line = f"seed {self.seed} step {self.step_no}: {text}"
        self.notes.append(line)
        self.say(f"NOTE {text}")
        print(line)

    # -- the agent --

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = await self.agent.call(method, path, body)
        self.check(status == 200, f"{method} {path} {body}: HTTP {status} {reply}")
        return reply

    async def create_task(self) -> None:
        body = {"params": {"name": "cbt-backup", "vmInstanceUuid": self.vm.vm_uuid}}
        self.task_uuid = (await self.api("POST", "/cbt-task/create", body))["inventory"]["uuid"]

    # -- checks --

    def check_disk(
        self,
        where: str,
        volume_uuid: str,
        mode: str,
        since: str | None,
        reason: str | None,
        asked: str | None,
        dirty: set[int] | None,
        full_because: str | None = None,
    ) -> str:
        """The rule of the module docstring for one disk of one Enable; returns a log word."""
        disk = self.model.disk(volume_uuid)
        expected_full = full_because or self.model.full_expected(asked, volume_uuid)
        if mode == "full":
            self.check(bool(reason), f"{where} {disk.name}: full without a reason")
            if expected_full is None:
                self.note(
                    f"{where} {disk.name}: full although the model expects an exact "
                    f"incremental since {asked or self.model.order[-1]}; reason: {reason}"
                )
            return f"{disk.name}=full"
        self.check(mode == "incremental", f"{where} {disk.name}: mode {mode!r}")
        want = asked if asked is not None else (self.model.order[-1] if self.model.order else None)
        self.check(
            since == want,
            f"{where} {disk.name}: incremental since {since!r}, expected since {want!r}",
        )
        assert since is not None and dirty is not None
        entry = self.model.since[since][volume_uuid]
        self.check(
            QEMU_KILLED not in entry.lost,
            f"{where} {disk.name}: incremental since {since} although QEMU was killed since "
            f"then (its bitmaps are inconsistent or gone): only a full is correct; dirty "
            f"clusters {runs(dirty)}, written since {runs(entry.written)}",
        )
        if entry.lost:
            self.note(
                f"{where} {disk.name}: incremental since {since} although "
                f"{', '.join(entry.lost)} since then (dirty {runs(dirty)}, written "
                f"{runs(entry.written)}: checked as usual)"
            )
        missing = entry.written - dirty
        self.check(
            not missing,
            f"{where} {disk.name}: LOST CHANGES: the incremental since {since} misses "
            f"clusters {runs(missing)} written since then (dirty set {runs(dirty)}, written "
            f"{runs(entry.written)})",
        )
        extra = dirty - entry.written - entry.touched
        self.check(
            not extra,
            f"{where} {disk.name}: the incremental since {since} holds clusters {runs(extra)} "
            f"neither written nor touched by a chain operation since then (dirty {runs(dirty)}, "
            f"written {runs(entry.written)}, touched {runs(entry.touched)})",
        )
        return f"{disk.name}=inc({len(dirty)}/{len(entry.written)}w)"

    # -- steps --

    async def step_write(self) -> str:
        rng, did = self.rng, []
        for _ in range(rng.randint(1, 4)):
            disk = rng.choice(self.model.disks)
            size = len(disk.data)
            kind = rng.choices(
                ["aligned", "unaligned", "overlap", "small", "zeroes", "unmap"],
                weights=[3, 3, 2, 1, 1, 1],
            )[0]
            if kind == "overlap" and self.model.recent:
                disk, near = rng.choice(self.model.recent)
                size = len(disk.data)
                length = rng.randint(1, 200_000)
                offset = max(0, min(size - length, near + rng.randint(-70_000, 70_000)))
            elif kind == "aligned":
                g = disk.granularity
                length = g * rng.randint(1, 8)
                offset = g * rng.randrange(0, (size - length) // g + 1)
            elif kind == "small":
                length = 512
                offset = 512 * rng.randrange(0, size // 512)
            else:
                length = rng.randint(1, 300_000)
                offset = rng.randrange(0, size - length)
            if kind in ("zeroes", "unmap"):
                unmap = kind == "unmap"
                await asyncio.to_thread(
                    self.vm.write_zeroes_sync, disk.volume_uuid, offset, length, unmap
                )
                self.model.wrote(disk, offset, length, 0)
                did.append(f"{disk.name} {kind} {offset}+{length}")
            else:
                byte = rng.randint(1, 255)
                await asyncio.to_thread(self.vm.write_sync, disk.volume_uuid, offset, length, byte)
                self.model.wrote(disk, offset, length, byte)
                did.append(f"{disk.name} {kind} {offset}+{length}=0x{byte:02x}")
        return "write " + "; ".join(did)

    def chain_len(self, disk: DiskModel) -> int:
        return len(chainops.chain_files(self.vm, disk.volume_uuid))

    def chain_text(self, disk: DiskModel) -> str:
        files = chainops.chain_files(self.vm, disk.volume_uuid)
        return " <- ".join(p.name[:17] for p in files)

    async def step_snapshot(self) -> str:
        disks = self.model.disks
        chosen = disks if self.rng.random() < 0.4 else [self.rng.choice(disks)]
        vols = [d.volume_uuid for d in chosen]
        await asyncio.to_thread(chainops.snapshot, self.vm, vols, self.overlay_dir)
        names = ",".join(d.name for d in chosen)
        return f"live snapshot of {names}: " + " | ".join(self.chain_text(d) for d in chosen)

    async def step_chain_op(self, op: str, disk: DiskModel) -> str:
        vol = disk.volume_uuid
        if op == "commit_active":
            await asyncio.to_thread(chainops.commit_active, self.vm, vol)
        elif op == "commit_inactive":
            await asyncio.to_thread(chainops.commit_inactive, self.vm, vol)
        elif op == "stream":
            await asyncio.to_thread(chainops.stream, self.vm, vol)
        else:
            dest = self.overlay_dir / f"{vol[:8]}-copy-{self.step_no}.qcow2"
            await asyncio.to_thread(chainops.copy, self.vm, vol, dest)
        self.model.chain_op(disk)
        return f"{op} {disk.name}: {self.chain_text(disk)}"

    async def shutdown(self) -> None:
        """Clean shutdown; the images then hold exactly what the model says."""
        await asyncio.to_thread(self.vm.shutdown)
        for disk in self.model.disks:
            now = await self.read_disk(disk)
            if now != disk.data:
                self.fail(
                    f"after a clean shutdown {disk.name} does not hold what the guest wrote "
                    f"(the model or the chain operations are wrong): "
                    + difference(now, bytes(disk.data), disk.granularity)
                )

    async def step_restart_vm(self) -> str:
        await self.shutdown()
        await asyncio.to_thread(self.vm.start)
        return "clean shutdown (QMP quit), start"

    async def step_offline_snapshot(self) -> str:
        disk = self.rng.choice(self.model.disks)
        overlay = self.overlay_dir / f"{disk.volume_uuid[:8]}-offline-{self.step_no}.qcow2"
        await self.shutdown()
        await asyncio.to_thread(chainops.offline_snapshot, self.vm, disk.volume_uuid, overlay)
        await asyncio.to_thread(self.vm.start)
        self.model.lose([disk], OFFLINE_SNAPSHOT)
        return f"shutdown, offline snapshot of {disk.name}, start: {self.chain_text(disk)}"

    async def step_kill_agent(self) -> str:
        code = await self.agent.stop(signal.SIGKILL)
        await self.agent.start()
        return f"agent SIGKILL (exit {code}), restarted"

    async def step_kill_qemu(self) -> str:
        """A crash loses the writes QEMU had not flushed (its qcow2 metadata cache dies with
        it: a write's new clusters read as before): the model takes the disks as the crash left
        them; tracking is lost, so the next Enable must be a full anyway."""
        await asyncio.to_thread(self.vm.kill)
        gone = []
        for disk in self.model.disks:
            now = await self.read_disk(disk)
            g = disk.granularity
            lost = [
                c
                for c in range(disk.clusters)
                if now[c * g : (c + 1) * g] != disk.data[c * g : (c + 1) * g]
            ]
            if lost:
                gone.append(f"{disk.name} clusters {runs(lost)}")
            disk.data[:] = now
        await asyncio.to_thread(self.vm.start)
        self.model.lose(self.model.disks, QEMU_KILLED)
        return f"QEMU SIGKILL (unflushed writes lost: {'; '.join(gone) or 'none'}), start"

    async def read_disk(self, disk: DiskModel) -> bytes:
        """The disk's content from its image chain (the VM is shut off)."""
        top = chainops.chain_files(self.vm, disk.volume_uuid)[0]
        raw = self.workdir / f"{disk.volume_uuid}.read.raw"
        try:
            await run_tool("qemu-img", "convert", "-O", "raw", str(top), str(raw))
            data = await asyncio.to_thread(raw.read_bytes)
        finally:
            raw.unlink(missing_ok=True)
        if len(data) != len(disk.data):
            self.fail(f"{disk.name}: {top} reads {len(data)} bytes, not {len(disk.data)}")
        return data

    async def step_enable(self) -> str:
        rng = self.rng
        asked: str | None
        r = rng.random()
        if r < 0.3 or not self.model.order:
            asked = None
        elif r < 0.35:
            asked = f"cbt-{self.task_uuid[:12]}-nosuch"
        else:
            asked = rng.choice(self.model.order)
        body: dict[str, Any] = {"params": {} if asked is None else {"bitmapName": asked}}
        self.say(f"EnableCbtTask bitmapName={asked}")
        reply = await self.api("POST", f"/cbt-task/enable/{self.task_uuid}", body)
        infos = reply["volumeCbtBackupInfos"]
        names = {i["bitmapName"] for i in infos}
        self.check(len(names) == 1, f"Enable: several bitmapNames {names}")
        name = names.pop()
        self.check(
            sorted(i["volume"]["volumeUuid"] for i in infos)
            == sorted(d.volume_uuid for d in self.model.disks),
            f"Enable: volumes {[i['volume']['volumeUuid'] for i in infos]}",
        )
        words = []
        for info in infos:
            disk = self.model.disk(info["volume"]["volumeUuid"])
            dirty: set[int] | None = None
            if info["mode"] == "incremental":
                gran = int(info["granularity"])
                self.check(gran == disk.granularity, f"Enable {disk.name}: granularity {gran}")
                dirty = bitmap_clusters(info["bitmapBase64"], disk.clusters)
                self.check(
                    int(info["changedBytes"]) == disk.bytes_of(dirty),
                    f"Enable {disk.name}: changedBytes {info['changedBytes']} but bitmapBase64 "
                    f"has clusters {runs(dirty)}",
                )
            words.append(
                self.check_disk(
                    f"Enable({asked})",
                    disk.volume_uuid,
                    info["mode"],
                    info.get("sinceBitmapName"),
                    info.get("reason"),
                    asked,
                    dirty,
                )
            )
        await self.api("POST", f"/cbt-task/disable/{self.task_uuid}", {})
        self.model.cut(name)
        return f"Enable({asked}) -> {name}: {' '.join(words)}; Disable"

    async def step_backup(self) -> str:
        before = self.manifest_checkpoints()
        previous = before[-1]["name"] if before else None
        args = ["--url", self.agent.base, "--vm", self.vm.vm_uuid]
        code, out, err = await run_cli("backup", *args, "--dest", str(self.backup_dir))
        self.check(code == 0, f"cbt-agent backup failed ({code}):\n{out}\n{err}")
        after = self.manifest_checkpoints()
        self.check(len(after) == len(before) + 1, f"backup: manifest has {len(after)} checkpoints")
        cp = after[-1]
        name = str(cp["name"])
        words = []
        for d in cp["disks"]:
            disk = self.model.disk(d["volumeUuid"])
            dirty: set[int] | None = None
            since = d.get("sinceCheckpoint")
            if d["mode"] == "incremental":
                self.check(
                    d["backingFile"] is not None, f"backup {disk.name}: incremental w/o backing"
                )
                dirty = await self.file_clusters(self.backup_dir / d["file"], disk)
                self.check(
                    d["granularity"] == disk.granularity,
                    f"backup {disk.name}: granularity {d['granularity']}",
                )
                copied = disk.bytes_of(dirty)
                self.check(
                    copied == d["copiedBytes"],
                    f"backup {disk.name}: the file holds clusters {runs(dirty)} "
                    f"({copied} bytes) but copiedBytes = {d['copiedBytes']}",
                )
            words.append(
                self.check_disk(
                    f"backup({previous})",
                    disk.volume_uuid,
                    d["mode"],
                    since,
                    d.get("reason"),
                    previous,
                    dirty,
                    None if previous else "the first backup into an empty directory",
                )
            )
        self.model.cut(name)
        self.model.keep_image(name)
        await self.check_restores()
        return f"backup since {previous} -> {name}: {' '.join(words)}; restored all"

    def manifest_checkpoints(self) -> list[dict[str, Any]]:
        path = self.backup_dir / "manifest.json"
        if not path.exists():
            return []
        return list(json.loads(path.read_text())["checkpoints"])

    async def file_clusters(self, path: Path, disk: DiskModel) -> set[int]:
        """Clusters an incremental file holds itself (not through its backing file)."""
        out = await run_tool("qemu-img", "map", "--output=json", "-f", "qcow2", str(path))
        held: set[int] = set()
        for ext in json.loads(out):
            if ext["depth"] == 0 and (ext["data"] or ext["zero"]):
                held |= disk.span(int(ext["start"]), int(ext["length"]))
        return held

    async def check_restores(self) -> None:
        """Restore every checkpoint of the backup; each disk equals the model as of then."""
        for n, (name, images) in enumerate(self.model.images.items()):
            out = self.workdir / f"restore-{self.step_no}-{n}"
            code, sout, serr = await run_cli(
                "restore",
                "--dest",
                str(self.backup_dir),
                "--checkpoint",
                name,
                "--out",
                str(out),
            )
            self.check(code == 0, f"restore of {name} failed ({code}):\n{sout}\n{serr}")
            try:
                for vol, packed in images.items():
                    disk = self.model.disk(vol)
                    raw = out / f"{vol}.raw"
                    image = out / f"{vol}.qcow2"
                    await run_tool("qemu-img", "convert", "-O", "raw", str(image), str(raw))
                    got = await asyncio.to_thread(raw.read_bytes)
                    want = zlib.decompress(packed)
                    if got != want:
                        self.fail(
                            f"checkpoint {name}, disk {disk.name} ({vol}) restored wrong: "
                            + difference(got, want, disk.granularity)
                        )
            finally:
                shutil.rmtree(out, ignore_errors=True)

    # -- driver --

    def choices(self) -> list[tuple[str, int, DiskModel | None]]:
        """(step, weight, disk) of every step possible now."""
        out: list[tuple[str, int, DiskModel | None]] = [
            ("write", 30, None),
            ("snapshot", 9, None),
            ("restart_vm", 2, None),
            ("offline_snapshot", 2, None),
            ("kill_agent", 3, None),
            ("kill_qemu", 2, None),
            ("backup", 9, None),
            ("enable", 8, None),
        ]
        for disk in self.model.disks:
            n = self.chain_len(disk)
            share = len(self.model.disks)
            if n >= 2:
                out += [("commit_active", 6 // share + 1, disk), ("stream", 4 // share + 1, disk)]
            if n >= 3:
                out.append(("commit_inactive", 6 // share + 1, disk))
            out.append(("copy", 1, disk))
        return out

    async def step(self) -> None:
        self.step_no += 1
        options = self.choices()
        kind, _, disk = self.rng.choices(options, weights=[w for _, w, _ in options])[0]
        if self.step_no == STEPS:
            kind, disk = "backup", None  # every run ends with restores of every checkpoint
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.log.append(f"{self.step_no:02d} {kind}{' ' + disk.name if disk else ''}")
        began = time.monotonic()
        if disk is not None:
            text = await self.step_chain_op(kind, disk)
        else:
            text = await getattr(self, f"step_{kind}")()
        self.log.append(f"   -> {text} ({time.monotonic() - began:.1f} s)")


def difference(got: bytes, want: bytes, granularity: int) -> str:
    if len(got) != len(want):
        return f"size {len(got)} != {len(want)}"
    bad = [
        c
        for c in range(-(-len(want) // granularity))
        if got[c * granularity : (c + 1) * granularity]
        != want[c * granularity : (c + 1) * granularity]
    ]
    first = next(i for i in range(len(want)) if got[i] != want[i])
    return (
        f"clusters {runs(bad)} differ; first byte {first}: got 0x{got[first]:02x}, "
        f"expected 0x{want[first]:02x}"
    )


# ---- the test ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
async def test_chain_operations_never_lose_a_change(
    seed: int, agent: AgentProcess, chain_vms: ChainVms, tmp_path: Path
) -> None:
    rng = random.Random(seed * 7919)
    disks_mib = [16, 8] if rng.random() < 0.5 else [16, 8, 8]
    vm = chain_vms.make(disks_mib)
    fuzz = Fuzz(seed, agent, vm, chain_vms.overlay_dir, tmp_path)
    fuzz.log.append(
        f"seed {seed}: VM {vm.vm_uuid}, disks "
        + ", ".join(f"d{i}={v.volume_uuid} ({v.size // MIB} MiB)" for i, v in enumerate(vm.volumes))
    )
    began = time.monotonic()
    await agent.start()
    await fuzz.create_task()
    try:
        while fuzz.step_no < STEPS:
            await fuzz.step()
    except (RuntimeError, TimeoutError, OSError, KeyError, AssertionError) as e:
        fuzz.fail(f"{type(e).__name__}: {e}")
    elapsed = time.monotonic() - began
    print(f"seed {seed}: {STEPS} steps in {elapsed:.1f} s: {fuzz.counts}")
    print("\n".join(fuzz.log))
    if fuzz.notes:
        warnings.warn(FuzzNote("\n".join(fuzz.notes)), stacklevel=1)
    shutil.rmtree(fuzz.backup_dir, ignore_errors=True)
