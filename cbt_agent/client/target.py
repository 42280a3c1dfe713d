"""The write side of a backup: the qcow2 file being written (`X.part`), served by a qemu-nbd
this process starts and stops by pid; plus the file tools (paths kept inside a directory,
exclusive creation, publishing without replacing, checksum, atomic replace)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import time
from pathlib import Path

from cbt_agent.client.errors import BackupError
from cbt_agent.client.names import is_plain_name

QCOW2_MIN_CLUSTER = 512
QCOW2_MAX_CLUSTER = 2 << 20
START_TIMEOUT = 10.0  # qemu-nbd makes its socket in ~10 ms
EXIT_TIMEOUT = 30.0  # after the client's NBD shutdown: close (and flush) the image


async def run_tool(*cmd: str) -> str:
    """Run qemu-img & co.; BackupError with its stderr when it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as e:
        raise BackupError(f"cannot run {cmd[0]}: {e}") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        text = (err or out).decode(errors="replace").strip()
        raise BackupError(f"{cmd[0]} {cmd[1]} failed: {text}")
    return out.decode(errors="replace")


def cluster_size(granularity: int) -> int:
    """The qcow2 cluster size matching the tracking granularity (within qcow2's limits)."""
    return min(max(granularity, QCOW2_MIN_CLUSTER), QCOW2_MAX_CLUSTER)


def path_in(directory: Path, name: str) -> Path:
    """`directory/name`, for a plain file name whose path is not a symbolic link: what the
    client reads or writes stays in the backup (or output) directory. BackupError otherwise."""
    if not is_plain_name(name):
        raise BackupError(f"{name!r} is not a plain file name in {directory}: refused")
    path = directory / name
    if path.is_symlink():
        raise BackupError(f"{path} is a symbolic link: refused")
    if path.resolve().parent != directory.resolve():
        raise BackupError(f"{path} leads out of {directory}: refused")
    return path


def open_exclusive(path: Path) -> int:
    """Create `path` empty and owner-only, open for writing; BackupError, with nothing touched,
    when anything (a file, a symbolic link) is already there: nothing of someone else's is ever
    truncated or written through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise BackupError(f"{path} already exists: refusing to replace it") from None
    except OSError as e:
        raise BackupError(f"cannot create {path}: {e.strerror}") from None


def create_exclusive(path: Path) -> None:
    """`open_exclusive`, closed again: the empty file a tool (qemu-img) then fills."""
    os.close(open_exclusive(path))


def publish(part: Path, final: Path) -> None:
    """Give a complete file its final name, never replacing anything already there (a hard
    link, then the `.part` name removed; a plain rename after a check where the file system
    has no hard links)."""
    try:
        os.link(part, final, follow_symlinks=False)
    except FileExistsError:
        raise BackupError(f"{final} already exists: refusing to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise BackupError(f"cannot name {final}: {e.strerror}") from None
        if os.path.lexists(final):
            raise BackupError(f"{final} already exists: refusing to replace it") from None
        os.rename(part, final)
        return
    os.unlink(part)


async def create_image(path: Path, size: int, granularity: int, backing: str | None) -> None:
    """Make the empty file at `path` (made with `create_exclusive`) a qcow2; `backing` is a base
    name in the same directory (the chain stays movable), so an incremental reads everything it
    does not hold from the previous file."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    cmd += ["-o", f"cluster_size={cluster_size(granularity)}"]
    if backing is not None:
        cmd += ["-b", backing, "-F", "qcow2"]
    await run_tool(*cmd, str(path), str(size))
    os.chmod(path, 0o600)  # guest data


class QemuNbd:
    """`qemu-nbd -f qcow2 --cache=writeback -k SOCK FILE`: one client, exits when it leaves."""

    def __init__(self, image: Path, socket_path: Path) -> None:
        self.image = image
        self.socket_path = socket_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            "qemu-nbd",
            "-f",
            "qcow2",
            "--cache=writeback",
            "-k",
            str(self.socket_path),
            str(self.image),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket_path.exists():
            if self.proc.returncode is not None:
                raise BackupError(f"qemu-nbd on {self.image.name} exited: {await self._stderr()}")
            if time.monotonic() > deadline:
                await self.stop()
                raise BackupError(
                    f"qemu-nbd on {self.image.name} did not start in {START_TIMEOUT} s"
                )
            await asyncio.sleep(0.005)

    async def _stderr(self) -> str:
        assert self.proc is not None and self.proc.stderr is not None
        with contextlib.suppress(Exception):
            return (await self.proc.stderr.read()).decode(errors="replace").strip()
        return ""

    async def wait_exit(self) -> None:
        """After the client's NBD shutdown: qemu-nbd closes the image and exits 0."""
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            await self.stop()
            raise BackupError(
                f"qemu-nbd on {self.image.name} did not exit after the copy"
            ) from None
        if code != 0:
            raise BackupError(
                f"qemu-nbd on {self.image.name} failed ({code}): {await self._stderr()}"
            )
        self.proc = None

    async def stop(self) -> None:
        """Stop it by pid if it still runs (after a failure): SIGTERM, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, part_suffix: str) -> None:
    """Replace `path` with `data`: write `path<part_suffix>` (made exclusively), fsync, rename,
    fsync the dir."""
    tmp = path.with_name(path.name + part_suffix)
    fd = open_exclusive(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
