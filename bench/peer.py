"""virtnbdbackup, the most used open-source peer, made runnable for side-by-side benchmarks.

It is run unmodified from its release tarball (../shared/peers/ beside the project, or a path
given on the command line): unpacked once into PEER_CACHE with a venv of its requirements and
Debian's libnbd binding linked in, as its README there says. A yardstick only: nothing of it is
imported into the project.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PEERS = ROOT.parent / "shared" / "peers"
PEER_CACHE = Path("/var/tmp/cbt-bench-peer")
LIBNBD_FILES = (
    Path("/usr/lib/python3/dist-packages/nbd.py"),
    Path(f"/usr/lib/python3/dist-packages/libnbdmod.{sysconfig.get_config_var('SOABI')}.so"),
)


@dataclass(frozen=True)
class Peer:
    code: Path  # the directory holding the virtnbdbackup and virtnbdrestore scripts
    python: Path

    def backup(self, *args: str) -> list[str]:
        return [str(self.python), str(self.code / "virtnbdbackup"), *args]

    def restore(self, *args: str) -> list[str]:
        return [str(self.python), str(self.code / "virtnbdrestore"), *args]


def _tarball(where: Path) -> Path:
    if where.is_file():
        return where
    found = sorted(where.glob("virtnbdbackup-*.tar.gz"))
    if not found:
        raise SystemExit(f"no virtnbdbackup-*.tar.gz in {where}: pass --peer PATH")
    return found[-1]


def ensure_peer(where: Path = DEFAULT_PEERS) -> Peer:
    """The peer ready to run: `where` is its unpacked source directory, its tarball, or a
    directory holding the tarball. Unpacking and the venv are cached in PEER_CACHE."""
    if (where / "virtnbdbackup").is_file():
        code = where
        cache = PEER_CACHE / "source"
    else:
        tarball = _tarball(where)
        cache = PEER_CACHE / tarball.name.removesuffix(".tar.gz")
        code = cache / "virtnbdbackup"
        if not (code / "virtnbdbackup").is_file():
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            with tarfile.open(tarball) as tar:
                tar.extractall(cache, filter="data")
            if not (code / "virtnbdbackup").is_file():
                inner = [p for p in cache.iterdir() if (p / "virtnbdbackup").is_file()]
                if not inner:
                    raise SystemExit(f"{tarball} holds no virtnbdbackup script")
                code = inner[0]
    venv = cache / "venv"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if not ready.exists():
        print(f"[bench] making the peer's venv in {venv} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(code / "requirements.txt")],
            check=True,
        )
        site = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for f in LIBNBD_FILES:
            if not f.exists():
                raise SystemExit(f"missing {f} (Debian's python3-libnbd)")
            link = Path(site) / f.name
            link.unlink(missing_ok=True)
            link.symlink_to(f)
        ready.touch()
    return Peer(code, python)
