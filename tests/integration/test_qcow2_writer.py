"""The client's own qcow2 writer (cbt_agent/qcow2.py) against the real qemu-img: the
images it writes pass `qemu-img check`, read back (alone and as a chain) exactly the bytes
given, map the clusters it says, and hash to the sha256 it returns."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import stack

from cbt_agent.qcow2 import Layout, Qcow2Writer

CS = 64 << 10


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        stack.unavailable("qemu-img is not installed")


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def write_image(
    path: Path,
    size: int,
    reqs: list[tuple[int, int]],
    data: dict[int, bytes | None],
    zeros: list[tuple[int, int]] = [],  # noqa: B006 - read only
    backing: str | None = None,
    cs: int = CS,
) -> str:
    """Write `reqs` (data[offset] None: the read came back zero) and return the sha256."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = Qcow2Writer(fd, size, cs, reqs, zeros, backing)
        for off, _n in reqs:
            d = data[off]
            if d is None:
                w.store_zero()
            else:
                w.store(bytearray(d))
        digest = w.finish()
    finally:
        os.close(fd)
    return digest


def raw_of(image: Path, tmp: Path) -> bytes:
    raw = tmp / f"{image.stem}.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    out = raw.read_bytes()
    raw.unlink()
    return out


@pytest.mark.parametrize("cs", [CS, 512])  # 512: many L2 tables and refcount blocks
def test_a_full_and_an_incremental_read_back_exactly(tmp_path: Path, cs: int) -> None:
    rng = random.Random(7)
    size = 96 << 20 | 7 * 512  # ends inside a 64 KiB cluster
    end = size // cs * cs
    clusters = sorted(rng.sample(range(size // cs - 8), 120))
    reqs = [(c * cs, cs) for c in clusters if (c + 1) * cs < end]
    if end < size:
        reqs.append((end, size - end))  # the short last cluster
    last = clusters[-1] + 2
    if (last + 4) * cs <= end and all(o < last * cs for o, _ in reqs[:-1]):
        reqs.append((last * cs, 4 * cs))  # a request of several clusters
    reqs.sort()
    data: dict[int, bytes | None] = {}
    for i, (off, n) in enumerate(reqs):
        data[off] = None if i % 9 == 0 else rng.randbytes(n)
    full = tmp_path / "full.qcow2"
    digest = write_image(full, size, reqs, data, cs=cs)

    assert digest == hashlib.sha256(full.read_bytes()).hexdigest()
    assert "No errors were found" in qemu_img("check", "-f", "qcow2", str(full))
    expected = bytearray(size)
    for off, n in reqs:
        if data[off] is not None:
            expected[off : off + n] = data[off]  # type: ignore[assignment]
    assert raw_of(full, tmp_path) == expected
    # qemu sees exactly the stored requests as data, a zero read as nothing allocated
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(full)))
    data_runs = [(m["start"], m["length"]) for m in mapped if m["data"]]
    stored = [(off, n) for off, n in reqs if data[off] is not None]
    assert _merged(data_runs) == _merged(stored)

    # an incremental over it: new data, reads that came back zero, ranges marked zero
    inc_reqs = [r for r in reqs if r[1] == cs][::3]
    zeros = [r for r in reqs if r[1] == cs][1::3][:5]
    inc_data: dict[int, bytes | None] = {
        off: (None if i % 4 == 0 else rng.randbytes(n)) for i, (off, n) in enumerate(inc_reqs)
    }
    inc = tmp_path / "inc.qcow2"
    digest = write_image(inc, size, inc_reqs, inc_data, zeros, backing="full.qcow2", cs=cs)

    assert digest == hashlib.sha256(inc.read_bytes()).hexdigest()
    assert "No errors were found" in qemu_img("check", "-f", "qcow2", str(inc))
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2", str(inc)))
    assert info["backing-filename"] == "full.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["virtual-size"] == size
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    assert info["cluster-size"] == cs
    for off, n in inc_reqs:
        d = inc_data[off]
        expected[off : off + n] = bytes(n) if d is None else d
    for off, n in zeros:
        expected[off : off + n] = bytes(n)
    assert raw_of(inc, tmp_path) == expected


def test_nothing_to_store_and_a_large_cluster(tmp_path: Path) -> None:
    """An incremental with no change is a valid empty overlay; 2 MiB clusters work too."""
    size = 64 << 20
    full = tmp_path / "a.qcow2"
    big = 2 << 20
    reqs = [(0, big), (10 * big, 2 * big)]
    blocks = {0: b"\x01" * big, 10 * big: b"\x02" * (2 * big)}
    digest = write_image(full, size, reqs, dict(blocks.items()), cs=big)
    assert digest == hashlib.sha256(full.read_bytes()).hexdigest()
    assert "No errors were found" in qemu_img("check", "-f", "qcow2", str(full))
    empty = tmp_path / "b.qcow2"
    digest = write_image(empty, size, [], {}, backing="a.qcow2", cs=big)
    assert digest == hashlib.sha256(empty.read_bytes()).hexdigest()
    assert "No errors were found" in qemu_img("check", "-f", "qcow2", str(empty))
    raw = raw_of(empty, tmp_path)
    assert raw[:big] == blocks[0] and raw[10 * big : 12 * big] == blocks[10 * big]
    assert raw.count(0) == size - 3 * big


def test_the_refcount_structures_count_themselves() -> None:
    """Many data clusters need several refcount blocks; the plan covers every cluster."""
    lay = Layout.plan(8 << 40, 512, 200_000, range(3000))
    per_block = 512 * 8 // 16
    assert lay.refblocks * per_block >= lay.total
    assert lay.reftable_clusters * 512 // 8 >= lay.refblocks


def test_bad_ranges_are_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(ValueError, match="whole clusters"):
            Qcow2Writer(fd, 1 << 20, CS, [(100, CS)])
        with pytest.raises(ValueError, match="inside a cluster"):
            Qcow2Writer(fd, 1 << 20, CS, [(0, CS + 1)])
        with pytest.raises(ValueError, match="backing"):
            Qcow2Writer(fd, 1 << 20, CS, [], [(0, CS)])
        w = Qcow2Writer(fd, 1 << 20, CS, [(0, CS)])
        with pytest.raises(ValueError, match="expected"):
            w.store(b"short")
        with pytest.raises(ValueError, match="never stored"):
            w.finish()
    finally:
        os.close(fd)


def _merged(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, n in sorted(runs):
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out
