"""The scratch qcow2 the agent writes itself: what qemu-img makes of it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import stack

from cbt_agent.qemu import empty_image

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        stack.unavailable("qemu-img is not installed")  # a failure under CI=true


@pytest.mark.parametrize("size", [0, 1, 65536, 8 * GIB + 512, 1 << 40, 10 << 40])
def test_qemu_img_finds_a_clean_empty_image_of_the_size(tmp_path: Path, size: int) -> None:
    path = tmp_path / "scratch.qcow2"
    empty_image.write_empty_qcow2(str(path), size)

    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found" in check.stdout
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == -(-size // 512) * 512
    assert info["cluster-size"] == 65536
    assert info["format-specific"]["data"]["compat"] == "1.1"
    mapped = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert all(not m["data"] for m in mapped)  # nothing allocated: reads are zeros
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_existing_file_is_replaced_and_made_private(tmp_path: Path) -> None:
    path = tmp_path / "scratch.qcow2"
    path.write_bytes(b"x" * 1_000_000)
    path.chmod(0o644)
    empty_image.write_empty_qcow2(str(path), GIB)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_size == 4 * 65536


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / "scratch.qcow2").symlink_to(target)
    with pytest.raises(OSError):
        empty_image.write_empty_qcow2(str(tmp_path / "scratch.qcow2"), GIB)
    assert target.read_bytes() == b""
