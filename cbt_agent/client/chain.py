"""The backup directory's manifest and its chains: pure data and rules, no I/O.

A backup directory holds one qcow2 file per disk per checkpoint. A full file stands alone; an
incremental file holds only the clusters that changed and is backed (by base name) by the file
of the same disk at the checkpoint the changes are counted from. The manifest lists, per
checkpoint, every disk's file with its checksum; a disk's chain is found by following the
backing names back to a full file.

A manifest is read as untrusted input: every uuid and checkpoint name must have the form the
agent gives them, and every file name must be exactly the one the client builds from them
(`disk_file_name`), so nothing in it can name a path outside the directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cbt_agent.client.errors import ManifestError, UnknownCheckpoint
from cbt_agent.client.names import (
    CHECKPOINT_FORM,
    UUID_FORM,
    is_checkpoint_name,
    is_plain_name,
    is_uuid,
)

MANIFEST_NAME = "manifest.json"
PART_SUFFIX = ".part"  # every file being written carries it until it is complete
FORMAT_VERSION = 1
FULL = "full"
INCREMENTAL = "incremental"
MIXED = "mixed"  # a checkpoint with full and incremental disks (e.g. a disk added since)


@dataclass(frozen=True)
class DiskBackup:
    """One disk's file at one checkpoint."""

    volume_uuid: str
    file: str  # base name, relative to the backup directory
    backing_file: str | None  # base name of the file this one is backed by (incremental)
    mode: str  # FULL | INCREMENTAL
    size: int  # virtual size in bytes
    granularity: int  # bytes per tracked cluster (= the file's qcow2 cluster size)
    copied_bytes: int  # bytes read from the export and stored (whole clusters)
    sha256: str  # of the file as written
    reason: str | None = None  # why full
    since: str | None = None  # the checkpoint the changes are counted from (incremental)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "volumeUuid": self.volume_uuid,
            "file": self.file,
            "backingFile": self.backing_file,
            "mode": self.mode,
            "size": self.size,
            "granularity": self.granularity,
            "copiedBytes": self.copied_bytes,
            "sha256": self.sha256,
        }
        if self.mode == FULL:
            d["reason"] = self.reason
        else:
            d["sinceCheckpoint"] = self.since
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> DiskBackup:
        disk = cls(
            volume_uuid=_str(d, "volumeUuid", where),
            file=_str(d, "file", where),
            backing_file=_opt_str(d, "backingFile", where),
            mode=_str(d, "mode", where),
            size=_int(d, "size", where),
            granularity=_int(d, "granularity", where),
            copied_bytes=_int(d, "copiedBytes", where),
            sha256=_str(d, "sha256", where),
            reason=_opt_str(d, "reason", where),
            since=_opt_str(d, "sinceCheckpoint", where),
        )
        if disk.mode not in (FULL, INCREMENTAL):
            raise ManifestError(f"{where}.mode: {disk.mode!r} is not full or incremental")
        if (disk.mode == FULL) != (disk.backing_file is None):
            raise ManifestError(f"{where}: a full file has no backing file, an incremental has")
        if not is_plain_name(disk.file) or disk.file == MANIFEST_NAME:
            raise ManifestError(f"{where}.file: {disk.file!r} is not a plain file name")
        return disk


@dataclass(frozen=True)
class CheckpointBackup:
    """Every disk of the VM as of one checkpoint (one Enable)."""

    name: str
    mode: str  # FULL | INCREMENTAL | MIXED
    created: str  # ISO 8601, UTC
    disks: tuple[DiskBackup, ...]

    def disk(self, volume_uuid: str) -> DiskBackup | None:
        for d in self.disks:
            if d.volume_uuid == volume_uuid:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "created": self.created,
            "disks": [d.to_dict() for d in self.disks],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> CheckpointBackup:
        disks = d.get("disks")
        if not isinstance(disks, list) or not disks:
            raise ManifestError(f"{where}.disks: a non-empty list is required")
        return cls(
            name=_str(d, "name", where),
            mode=_str(d, "mode", where),
            created=_str(d, "created", where),
            disks=tuple(
                DiskBackup.from_dict(_obj(x, f"{where}.disks[{i}]"), f"{where}.disks[{i}]")
                for i, x in enumerate(disks)
            ),
        )


@dataclass(frozen=True)
class Manifest:
    """What a backup directory holds: its VM, the CBT task, the checkpoints oldest first."""

    vm_uuid: str
    task_uuid: str | None = None
    checkpoints: tuple[CheckpointBackup, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "formatVersion": FORMAT_VERSION,
            "vmInstanceUuid": self.vm_uuid,
            "taskUuid": self.task_uuid,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }

    @classmethod
    def from_dict(cls, d: object) -> Manifest:
        """Parse and check a manifest; raises ManifestError naming the bad field."""
        top = _obj(d, "manifest")
        version = top.get("formatVersion")
        if version != FORMAT_VERSION:
            raise ManifestError(f"manifest.formatVersion: {version!r} is not {FORMAT_VERSION}")
        cps = top.get("checkpoints")
        if not isinstance(cps, list):
            raise ManifestError("manifest.checkpoints: a list is required")
        m = cls(
            vm_uuid=_str(top, "vmInstanceUuid", "manifest"),
            task_uuid=_opt_str(top, "taskUuid", "manifest"),
            checkpoints=tuple(
                CheckpointBackup.from_dict(_obj(c, f"checkpoints[{i}]"), f"checkpoints[{i}]")
                for i, c in enumerate(cps)
            ),
        )
        check(m)
        return m


# ---- rules ------------------------------------------------------------------------------------


def checkpoint_mode(disks: Iterable[DiskBackup]) -> str:
    modes = {d.mode for d in disks}
    return modes.pop() if len(modes) == 1 else MIXED


def next_bitmap_name(m: Manifest) -> str | None:
    """The `bitmapName` for the next Enable: the latest checkpoint whose backup completed
    (only completed ones reach the manifest). None before the first backup."""
    return m.checkpoints[-1].name if m.checkpoints else None


def find_checkpoint(m: Manifest, name: str | None) -> CheckpointBackup:
    """The checkpoint called `name` (None: the latest); UnknownCheckpoint names the known ones."""
    if not m.checkpoints:
        raise UnknownCheckpoint("the backup directory has no checkpoint yet")
    if name is None:
        return m.checkpoints[-1]
    for cp in m.checkpoints:
        if cp.name == name:
            return cp
    known = ", ".join(c.name for c in m.checkpoints)
    raise UnknownCheckpoint(f"checkpoint {name!r} is not in this backup (known: {known})")


def files(m: Manifest) -> dict[str, DiskBackup]:
    """Every file the manifest knows, by name."""
    return {d.file: d for cp in m.checkpoints for d in cp.disks}


def chain_of(m: Manifest, checkpoint: str | None, volume_uuid: str) -> list[DiskBackup]:
    """The files that make `volume_uuid` as of `checkpoint` (None: latest), base first.

    Raises UnknownCheckpoint, or ManifestError when the disk is not in that checkpoint or a
    backing file is not in the manifest.
    """
    cp = find_checkpoint(m, checkpoint)
    top = cp.disk(volume_uuid)
    if top is None:
        raise ManifestError(f"disk {volume_uuid} is not in checkpoint {cp.name}")
    known = files(m)
    chain = [top]
    while chain[-1].backing_file is not None:
        backing = known.get(chain[-1].backing_file)
        if backing is None or backing.volume_uuid != volume_uuid or backing in chain:
            raise ManifestError(
                f"{chain[-1].file}: backing file {chain[-1].backing_file} is not an earlier "
                f"file of disk {volume_uuid} in the manifest"
            )
        chain.append(backing)
    chain.reverse()
    return chain


@dataclass(frozen=True)
class DiskTarget:
    """What this backup writes for one disk: a full file, or an incremental on `backing`."""

    volume_uuid: str
    mode: str
    file: str
    backing: DiskBackup | None
    reason: str | None


def disk_file_name(volume_uuid: str, checkpoint: str, mode: str) -> str:
    return f"{volume_uuid}.{checkpoint}.{'full' if mode == FULL else 'inc'}.qcow2"


def plan_target(
    m: Manifest,
    checkpoint: str,
    volume_uuid: str,
    agent_mode: str,
    since: str | None,
    reason: str | None,
) -> DiskTarget:
    """Decide the file for one disk from what Enable answered.

    An incremental is stacked on the disk's file at `since`. When this directory has no file of
    the disk at `since`, the disk is copied in full instead (the export is a whole point-in-time
    view, so that is always possible): never an incremental on the wrong base.
    """

    def full(why: str | None) -> DiskTarget:
        return DiskTarget(
            volume_uuid, FULL, disk_file_name(volume_uuid, checkpoint, FULL), None, why
        )

    if agent_mode != INCREMENTAL:
        return full(reason)
    base = None
    if since is not None:
        for cp in m.checkpoints:
            if cp.name == since:
                base = cp.disk(volume_uuid)
    if base is None:
        return full(f"no file of this disk at checkpoint {since} in the backup directory")
    return DiskTarget(
        volume_uuid, INCREMENTAL, disk_file_name(volume_uuid, checkpoint, INCREMENTAL), base, None
    )


def with_checkpoint(m: Manifest, cp: CheckpointBackup, task_uuid: str | None) -> Manifest:
    """The manifest with `cp` appended; ManifestError if it would make the manifest invalid."""
    new = replace(m, task_uuid=task_uuid, checkpoints=(*m.checkpoints, cp))
    check(new)
    return new


def check(m: Manifest) -> None:
    """Raise ManifestError unless every name has the client's form, names are unique and every
    chain is whole."""
    check_names(m)
    names: set[str] = set()
    seen: set[str] = set()
    for cp in m.checkpoints:
        if cp.name in names:
            raise ManifestError(f"checkpoint {cp.name} appears twice")
        names.add(cp.name)
        vols = [d.volume_uuid for d in cp.disks]
        if len(set(vols)) != len(vols):
            raise ManifestError(f"checkpoint {cp.name} lists a disk twice")
        for d in cp.disks:
            if d.file in seen:
                raise ManifestError(f"file {d.file} appears twice")
            if d.backing_file is not None and d.backing_file not in seen:
                raise ManifestError(
                    f"{d.file}: backing file {d.backing_file} is not an earlier file"
                )
            seen.add(d.file)
    for cp in m.checkpoints:
        for d in cp.disks:
            chain_of(m, cp.name, d.volume_uuid)
    check_file_names(m)


def check_names(m: Manifest) -> None:
    """ManifestError naming the first uuid or checkpoint name the client would not have
    written (the names become paths: only the agent's own forms are safe)."""
    if not is_uuid(m.vm_uuid):
        raise ManifestError(f"manifest.vmInstanceUuid: {m.vm_uuid!r} is not a uuid ({UUID_FORM})")
    if m.task_uuid is not None and not is_uuid(m.task_uuid):
        raise ManifestError(f"manifest.taskUuid: {m.task_uuid!r} is not a uuid ({UUID_FORM})")
    for i, cp in enumerate(m.checkpoints):
        where = f"checkpoints[{i}]"
        if not is_checkpoint_name(cp.name):
            raise ManifestError(f"{where}.name: {cp.name!r} is not {CHECKPOINT_FORM}")
        for j, d in enumerate(cp.disks):
            at = f"{where}.disks[{j}]"
            if not is_uuid(d.volume_uuid):
                raise ManifestError(
                    f"{at}.volumeUuid: {d.volume_uuid!r} is not a uuid ({UUID_FORM})"
                )
            if d.since is not None and not is_checkpoint_name(d.since):
                raise ManifestError(f"{at}.sinceCheckpoint: {d.since!r} is not {CHECKPOINT_FORM}")


def check_file_names(m: Manifest) -> None:
    """ManifestError naming the first file whose name is not the one the client gives that
    disk's file at that checkpoint (`disk_file_name`)."""
    for i, cp in enumerate(m.checkpoints):
        for j, d in enumerate(cp.disks):
            expected = disk_file_name(d.volume_uuid, cp.name, d.mode)
            if d.file != expected:
                raise ManifestError(
                    f"checkpoints[{i}].disks[{j}].file: {d.file!r} is not {expected!r}, the "
                    "name of that disk's file at that checkpoint"
                )


# ---- parsing helpers ------------------------------------------------------------------------


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: an object is required")
    return value


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where}.{key}: a non-empty string is required")
    return v


def _opt_str(d: Mapping[str, Any], key: str, where: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise ManifestError(f"{where}.{key}: a string or null is required")
    return v


def _int(d: Mapping[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ManifestError(f"{where}.{key}: a non-negative integer is required")
    return v
