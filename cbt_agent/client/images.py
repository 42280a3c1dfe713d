"""What each backup file really is, as qemu-img reads it, against what the manifest says.

A matching sha256 proves only that a file is the one the manifest recorded, and the manifest is
not trusted either: a qcow2 header can name any backing file (a host file such as /etc/shadow,
a device, a URL) or an external data file, and `qemu-img convert` would then restore that
file's contents into the image. So, before `verify` calls a file good or `restore` converts a
chain:

1. each file's own header is read without opening anything it names (`qemu-img info -f qcow2`
   opens neither backing nor data file): qcow2, the manifest's virtual size, no external data
   file, and backed by exactly the manifest's previous file of the disk as qcow2 (a full: by
   nothing);
2. then `qemu-img info --backing-chain` on the chain's top, which by (1) opens only files of
   the directory, must list exactly the manifest's files, base last.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbt_agent.client.chain import DiskBackup
from cbt_agent.client.errors import BackupError
from cbt_agent.client.target import path_in

QEMU_IMG_TIMEOUT = 60.0


def _qemu_img_info(path: Path, *, chain: bool) -> Any:
    cmd = ["qemu-img", "info", "--output=json", "-f", "qcow2"]
    if chain:
        cmd.append("--backing-chain")
    try:
        proc = subprocess.run(
            [*cmd, str(path)], capture_output=True, timeout=QEMU_IMG_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackupError(f"cannot run qemu-img info on {path}: {e}") from None
    if proc.returncode != 0:
        text = " ".join(proc.stderr.decode(errors="replace").split())
        raise BackupError(f"{path.name}: qemu-img cannot read it as qcow2: {text}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BackupError(f"{path.name}: qemu-img info gave no JSON") from None


def header_problem(info: Mapping[str, Any], disk: DiskBackup) -> str | None:
    """What is wrong with one file's header (`qemu-img info` JSON) for the manifest's `disk`;
    None when it is what the client writes. Pure."""
    if info.get("format") != "qcow2":
        return f"format {info.get('format')!r}, not qcow2"
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict) and data.get("data-file") is not None:
        return f"its data lives in an external file {data['data-file']!r}"
    if info.get("virtual-size") != disk.size:
        return f"virtual size {info.get('virtual-size')}, the manifest says {disk.size}"
    backing = info.get("backing-filename")
    if disk.backing_file is None:
        if backing is not None:
            fmt = info.get("backing-filename-format")
            return f"a full file backed by {backing!r} ({fmt}): the manifest says no backing"
        return None
    if backing != disk.backing_file:
        return f"backed by {backing!r}, the manifest says {disk.backing_file!r}"
    if info.get("backing-filename-format") != "qcow2":
        return f"its backing file's format is {info.get('backing-filename-format')!r}, not qcow2"
    return None


def chain_problem(layers: Sequence[Any], dest: Path, chain: Sequence[DiskBackup]) -> str | None:
    """What is wrong with `qemu-img info --backing-chain` (top first) of the top of `chain`
    (base first) in `dest`; None when it lists exactly the manifest's files. Pure."""
    expected = [str(dest / d.file) for d in reversed(chain)]
    got = [layer.get("filename") if isinstance(layer, dict) else None for layer in layers]
    if got != expected:
        return f"its backing chain is {got}, the manifest's is {expected}"
    for layer, disk in zip(layers, reversed(chain), strict=True):
        problem = header_problem(layer, disk)
        if problem is not None:
            return f"{disk.file} in its backing chain: {problem}"
    return None


def file_problem(dest: Path, disk: DiskBackup) -> str | None:
    """What is wrong with one file of the directory as the manifest describes it (missing, a
    link, its header), or None."""
    try:
        path = path_in(dest, disk.file)
    except BackupError as e:
        return e.message
    if not path.is_file():
        return "missing"
    try:
        return header_problem(_qemu_img_info(path, chain=False), disk)
    except BackupError as e:
        return e.message


def backing_chain_problem(dest: Path, chain: Sequence[DiskBackup]) -> str | None:
    """What is wrong with the backing chain qemu follows from the top of `chain` (base first,
    as `chain_of` gives it), or None. Only after `file_problem` passed every file of it:
    qemu then opens nothing but files of `dest`."""
    dest = dest.resolve()
    try:
        layers = _qemu_img_info(dest / chain[-1].file, chain=True)
    except BackupError as e:
        return e.message
    return chain_problem(layers if isinstance(layers, list) else [], dest, chain)


def check_chain(dest: Path, chain: Sequence[DiskBackup]) -> None:
    """BackupError naming the first file of `chain` (base first) whose header or real backing
    chain differs from the manifest. Blocking: run it in a thread."""
    for disk in chain:
        problem = file_problem(dest, disk)
        if problem is not None:
            raise BackupError(f"{dest / disk.file}: {problem}: refused")
    problem = backing_chain_problem(dest, chain)
    if problem is not None:
        raise BackupError(f"{dest / chain[-1].file}: {problem}: refused")
