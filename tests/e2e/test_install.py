"""The production install (scripts/install.sh) leaves the host's libvirt alone and gives a
working agent: run from a copy of this checkout with DESTDIR, then checked file by file."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import stack

ROOT = Path(__file__).resolve().parents[2]
QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_install_leaves_libvirt_alone_and_installs_a_working_agent(tmp_path: Path) -> None:
    if (
        shutil.which("dpkg-query") is None
        or not Path("/usr/lib/python3/dist-packages/nbd.py").exists()
    ):
        stack.unavailable("Debian with python3-libnbd (scripts/setup.sh installs it)")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    copy = tmp_path / "cbt-agent"
    for name in filter(None, files):
        src, dst = ROOT / name.decode(), copy / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    dest = tmp_path / "root"
    before = _digest(QEMU_CONF)
    text = (copy / "scripts" / "install.sh").read_text()
    assert "qemu.conf" not in text.replace("never edits /etc/libvirt", "")
    result = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=copy,
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _digest(QEMU_CONF) == before  # libvirt's configuration untouched

    unit = dest / "etc/systemd/system/cbt-agent.service"
    lines = unit.read_text().splitlines()
    assert f"ExecStart={copy}/.venv/bin/cbt-agent serve" in lines
    config_dir = dest / "etc/cbt-agent"
    assert stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    config = config_dir / "config.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert config.read_text() == (copy / "config.example.toml").read_text()
    version = subprocess.run(
        [str(copy / ".venv/bin/cbt-agent"), "--version"], capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("cbt-agent "), version
    # the product only: no test tools in the host's venv
    tools = subprocess.run(
        [str(copy / ".venv/bin/python"), "-c", "import pytest"], capture_output=True
    )
    assert tools.returncode != 0
    # a second run keeps the operator's config
    config.write_text("# edited\n")
    again = subprocess.run(
        ["bash", "scripts/install.sh"],
        cwd=copy,
        env={**os.environ, "DESTDIR": str(dest)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert config.read_text() == "# edited\n"
