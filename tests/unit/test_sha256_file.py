"""`sha256_file` reads in a thread while it hashes: the digest is hashlib's for every size
around the chunk boundaries, and a read error reaches the caller."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cbt_agent.client import target


@pytest.mark.parametrize("chunks", [0, 1, 3, 5])
@pytest.mark.parametrize("extra", [0, 1, 4095])
def test_digest_is_hashlibs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunks: int, extra: int
) -> None:
    monkeypatch.setattr(target, "HASH_CHUNK", 4096)  # 5 chunks: more than its 4 buffers
    data = os.urandom(chunks * 4096 + extra)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert target.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_a_read_error_is_raised(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        target.sha256_file(tmp_path)
