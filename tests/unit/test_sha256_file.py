"""`sha256_file` reads in threads while it hashes: the digest is hashlib's for every size
around the chunk boundaries, buffered or past the page cache (O_DIRECT, and where the file
system refuses that), and a read error reaches the caller."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

import pytest

from cbt_agent.client import target


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("chunks", [0, 1, 3, 5, 9])
@pytest.mark.parametrize("extra", [0, 1, 4095])
def test_digest_is_hashlibs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: int, extra: int, direct: bool
) -> None:
    monkeypatch.setattr(target, "HASH_CHUNK", 4096)  # 5, 9 chunks: more than its 4 (8) reads ahead
    data = os.urandom(chunks * 4096 + extra)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert target.sha256_file(path, direct=direct) == hashlib.sha256(data).hexdigest()


def test_direct_reads_leave_no_descriptor_open(tmp_path: Path) -> None:
    data = os.urandom(3 * (8 << 20) + 12345)
    path = tmp_path / "f"
    path.write_bytes(data)
    fds = set(os.listdir("/proc/self/fd"))
    assert target.sha256_file(path, direct=True) == hashlib.sha256(data).hexdigest()
    assert set(os.listdir("/proc/self/fd")) == fds


def test_o_direct_refused_at_read_falls_back_to_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems take O_DIRECT at open and refuse it (EINVAL) at the read."""
    monkeypatch.setattr(target, "HASH_CHUNK", 4096)
    data = os.urandom(5 * 4096 + 7)
    path = tmp_path / "f"
    path.write_bytes(data)
    real = os.preadv
    refused = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    assert target.sha256_file(path, direct=True) == hashlib.sha256(data).hexdigest()
    assert refused  # it was tried, then left


def test_a_read_error_is_raised(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        target.sha256_file(tmp_path)
