"""The reference client's trims on the export it copies (`client/copy.py`), against a real
qemu-nbd and libnbd: nothing is trimmed before it was read and stored, the trims behind the copy
cover what was stored in steps of `trim_step`, the ranges the copy never reads are trimmed up
front, and the backup file holds exactly the bytes the export had before any trim.

On the agent's export a trim frees the scratch copy of what the guest overwrote since the
checkpoint: trimming a range before reading it would put zeroes in the backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest
import stack

from cbt_agent.client.copy import BufferPool, copy_into
from cbt_agent.qcow2 import Qcow2Writer
from cbt_agent.qemu import nbd as nbdio

MIB = 1 << 20
SIZE = 32 * MIB
# what the copy reads: 1 MiB requests, with gaps between them
REQUESTS = [(i * MIB, MIB) for i in (0, 1, 2, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 24)]
GAPS = [(18 * MIB, 6 * MIB), (25 * MIB, 7 * MIB)]  # never read: trimmed before the first read
STEP = 4 * MIB


@pytest.fixture
def export(tmp_path: Path) -> Iterator[tuple[str, bytes, Path]]:
    """A raw file of random bytes exported by qemu-nbd (discards punch holes) on a unix socket:
    its socket, its bytes, its path. qemu-nbd is stopped by its pid."""
    if shutil.which("qemu-nbd") is None:
        stack.unavailable("qemu-nbd is not installed")
    data = os.urandom(SIZE)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    sock = str(tmp_path / "nbd.sock")
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "--discard=unmap", "--cache=none", "-k", sock, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-nbd did not make its socket"
            time.sleep(0.01)
        yield sock, data, path
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Recording:
    """A libnbd handle that notes, for each trim, the reads already completed when it was sent
    (the copy stores a read only once it is completed)."""

    def __init__(self, h: Any) -> None:
        self.h = h
        self.reads: dict[int, tuple[int, int]] = {}  # cookie -> (offset, length)
        self.completed: set[tuple[int, int]] = set()
        self.trims: list[tuple[int, int, frozenset[tuple[int, int]], int]] = []

    def aio_pread(self, buf: Any, offset: int) -> int:
        cookie = int(self.h.aio_pread(buf, offset))
        self.reads[cookie] = (offset, int(buf.size()))
        return cookie

    def aio_command_completed(self, cookie: int) -> bool:
        done = bool(self.h.aio_command_completed(cookie))
        if done and cookie in self.reads:
            self.completed.add(self.reads[cookie])
        return done

    def aio_trim(self, count: int, offset: int) -> int:
        self.trims.append((offset, count, frozenset(self.completed), len(self.reads)))
        return int(self.h.aio_trim(count, offset))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.h, name)


def test_trims_follow_the_copy_and_never_run_ahead_of_it(
    export: tuple[str, bytes, Path], tmp_path: Path
) -> None:
    sock, data, path = export
    h = nbdio.connect(nbdio.NbdAddress(None, None, sock, ""))
    src = Recording(h)
    out = tmp_path / "backup.qcow2"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    done: list[int] = []
    try:
        image = Qcow2Writer(fd, SIZE, 64 << 10, REQUESTS, [], None)
        copy_into(
            src,
            image,
            on_done=done.append,
            pool=BufferPool(),
            max_in_flight=4,
            trim=True,
            trim_step=STEP,
            trim_first=GAPS,
        )
        image.finish()
    finally:
        os.close(fd)
        nbdio.close(h)
    assert done == [n for _off, n in REQUESTS]

    # the gaps first, before any read
    assert [(off, n, reads) for off, n, _c, reads in src.trims[:2]] == [(*g, 0) for g in GAPS]
    behind = src.trims[2:]
    # behind the copy: contiguous from 0, each only over reads completed when it was sent
    pos = 0
    for off, n, completed, _reads in behind:
        assert off == pos
        below = [r for r in REQUESTS if r[0] < off + n]
        assert set(below) <= completed, f"trim [{off}, {off + n}) ran ahead of the copy"
        assert off + n in {o + ln for o, ln in REQUESTS}  # ends where a stored request ends
        assert sum(ln for o, ln in below if o >= off) >= STEP  # one per STEP stored, no more
        pos = off + n
    read = sum(n for _o, n in REQUESTS)
    assert 1 <= len(behind) <= read // STEP
    tail = sum(n for o, n in REQUESTS if o >= pos)
    assert tail < STEP  # all but less than one step of what was read is trimmed

    # the backup holds the bytes from before any trim
    assert_holds_requests(out, data, tmp_path)
    # and the export lost what was trimmed (holes read as zero), nothing else
    after = path.read_bytes()
    trimmed = [(off, n) for off, n, _c, _r in src.trims]
    for off, n in trimmed:
        assert after[off : off + n] == bytes(n), f"[{off}, {off + n}) was not trimmed"
    assert after[pos:] == _zeroed(data, [(o, n) for o, n in trimmed if o >= pos])[pos:]


def assert_holds_requests(image: Path, data: bytes, tmp_path: Path) -> None:
    """The qcow2 `image` reads back the export's bytes of every request."""
    raw = tmp_path / "backup.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)], check=True
    )
    got = raw.read_bytes()
    for off, n in REQUESTS:
        assert got[off : off + n] == data[off : off + n], f"request at {off} differs"


def _zeroed(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for off, n in ranges:
        out[off : off + n] = bytes(n)
    return bytes(out)


def test_a_refused_trim_changes_nothing_read(
    export: tuple[str, bytes, Path], tmp_path: Path
) -> None:
    """A trim the server answers with an error is let go: the copy completes with the same
    bytes (the error is reported where libnbd reports it, at the command's completion)."""
    sock, data, _path = export
    h = nbdio.connect(nbdio.NbdAddress(None, None, sock, ""))

    class Refused(Recording):
        def __init__(self, h: Any) -> None:
            super().__init__(h)
            self.trim_cookies: set[int] = set()

        def aio_trim(self, count: int, offset: int) -> int:
            cookie = super().aio_trim(count, offset)
            self.trim_cookies.add(cookie)
            return cookie

        def aio_command_completed(self, cookie: int) -> bool:
            done = super().aio_command_completed(cookie)
            if done and cookie in self.trim_cookies:
                raise nbd.Error("Operation not supported", 95)
            return done

    src = Refused(h)
    out = tmp_path / "backup.qcow2"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        image = Qcow2Writer(fd, SIZE, 64 << 10, REQUESTS, [], None)
        copy_into(src, image, on_done=lambda n: None, pool=BufferPool(), trim=True,
                  trim_step=STEP, trim_first=GAPS)  # fmt: skip
        image.finish()
    finally:
        os.close(fd)
        nbdio.close(h)
    assert len(src.trim_cookies) >= 3  # the two gaps and at least one behind the copy
    assert_holds_requests(out, data, tmp_path)
