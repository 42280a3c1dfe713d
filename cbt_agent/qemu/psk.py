"""TLS pre-shared keys for the NBD exports: a fresh identity and key per Enable, the directory
QEMU's `tls-creds-psk` object reads (`keys.psk`, and `dh-params.pem`), and the short-lived file
libnbd's `set_tls_psk_file` reads on the client side.

Facts relied on (QEMU 7.2, GnuTLS 3.7, libnbd 1.14, verified here):
- `keys.psk` holds `identity:hexkey` lines; QEMU (through GnuTLS) looks the client's identity up
  in the file at every handshake, so a rewritten or removed file takes effect at once.
- Without `dh-params.pem` in its directory a server `tls-creds-psk` object generates 2048-bit
  DH parameters at `object-add`: ~0.8 s during which the VM's main loop is blocked. Writing the
  published RFC 7919 ffdhe2048 group makes `object-add` take ~2 ms.
- libnbd reads its PSK file during the handshake (inside `connect_*`): the file may go as soon as
  the connection is up.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path

from cbt_agent.contract.constants import PSK_IDENTITY_PATTERN, PSK_KEY_PATTERN
from cbt_agent.qemu.process import QemuUser, give
from cbt_agent.secretfiles import read_private

KEYS_FILE = "keys.psk"  # the name QEMU's tls-creds-psk reads in its `dir`
DH_PARAMS_FILE = "dh-params.pem"  # ditto, optional (generated, slowly, when absent)
QEMU_SUBDIR = "qemu"  # QEMU's own copy (see write_server_dir)
MAX_KEYS_FILE = 4096  # one identity:key line is under 100 bytes
KEY_BYTES = 32  # 256-bit keys
IDENTITY_PREFIX = "cbt-"

_IDENTITY = re.compile(PSK_IDENTITY_PATTERN)
_KEY = re.compile(PSK_KEY_PATTERN)


@dataclass(frozen=True)
class Psk:
    """A TLS pre-shared key: the identity (TLS username) the client presents and the key as
    lower-case hex. The key is left out of repr, so a logged address never shows it."""

    identity: str
    key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not _IDENTITY.fullmatch(self.identity):
            raise ValueError("a PSK identity is 1-64 letters, digits, '.', '_' or '-'")
        if not _KEY.fullmatch(self.key):
            raise ValueError(f"a PSK key is {KEY_BYTES * 2} lower-case hex digits")

    @classmethod
    def new(cls) -> Psk:
        """A fresh random identity and key (the identity says nothing about the task)."""
        return cls(IDENTITY_PREFIX + secrets.token_hex(8), secrets.token_hex(KEY_BYTES))

    def line(self) -> str:
        """The `keys.psk` line, as QEMU and libnbd read it."""
        return f"{self.identity}:{self.key}\n"

    @classmethod
    def parse(cls, text: str) -> Psk:
        """The first `identity:hexkey` line of a keys file. Raises ValueError."""
        for line in text.splitlines():
            identity, sep, key = line.strip().partition(":")
            if sep:
                return cls(identity, key)
        raise ValueError("no identity:key line")


def _write_private(path: Path, text: str, owner: QemuUser | None = None) -> None:
    """Write `text` to a new owner-only file at `path` (replaced atomically if one exists),
    owned by `owner` when given (else by the agent)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if owner is not None:
            give(Path(tmp), owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_dir(directory: Path, psk: Psk, owner: QemuUser | None) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)  # mkdir's mode is masked by the umask; an old dir is re-tightened
    if owner is not None:
        give(directory, owner)
    _write_private(directory / DH_PARAMS_FILE, ffdhe2048_pem(), owner)
    _write_private(directory / KEYS_FILE, psk.line(), owner)


def write_server_dir(directory: Path, psk: Psk, owner: QemuUser | None = None) -> Path:
    """Make `directory` (0700) hold what QEMU's server `tls-creds-psk` reads: `keys.psk` with
    only `psk` (0600, replacing any earlier key) and `dh-params.pem`, the agent's (what
    `read_server_dir` reads back: a secret the agent reads is its own). With `owner` (the user
    a VM's QEMU runs as) QEMU gets its own copy in `directory/qemu`, 0600 in 0700, owned by
    that user alone. Returns the directory QEMU is to read. Blocking."""
    _write_dir(directory, psk, None)
    if owner is None:
        return directory
    _write_dir(directory / QEMU_SUBDIR, psk, owner)
    return directory / QEMU_SUBDIR


def read_server_dir(directory: Path) -> Psk | None:
    """The key in `directory`'s keys.psk; None when there is none. NotPrivate when the file
    or the directory is not private (owned by this process's user or root, keys.psk 0600,
    the directory writable by nobody else): the key may have leaked. Blocking."""
    try:
        return Psk.parse(read_private(directory / KEYS_FILE, MAX_KEYS_FILE).decode())
    except (FileNotFoundError, NotADirectoryError, ValueError):  # UnicodeDecodeError too
        return None


def _remove_dir(directory: Path) -> None:
    for name in (KEYS_FILE, DH_PARAMS_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    for leftover in directory.glob(".*"):  # a temporary file of an interrupted write
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    with contextlib.suppress(FileNotFoundError):
        directory.rmdir()


def remove_server_dir(directory: Path) -> bool:
    """Remove the key (first QEMU's copy, which lets clients in: the credential dies with it)
    and the directories. Only the files this module writes are removed; False when there was
    no directory. Blocking."""
    if not directory.is_dir():
        return False
    if (directory / QEMU_SUBDIR).is_dir():
        _remove_dir(directory / QEMU_SUBDIR)
    _remove_dir(directory)
    return True


@contextlib.contextmanager
def client_file(psk: Psk) -> Iterator[str]:
    """A private temporary keys file holding `psk`, for libnbd's `set_tls_psk_file`; removed on
    exit (libnbd has read it once the handshake is done)."""
    fd, path = tempfile.mkstemp(prefix="cbt-nbd-psk-")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(psk.line())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ---- RFC 7919 ffdhe2048 ------------------------------------------------------------------------


def _e(digits: int) -> Decimal:
    """Euler's number to `digits` significant digits (its series)."""
    with localcontext() as ctx:
        ctx.prec = digits + 10
        total, term, k = Decimal(0), Decimal(1), 1
        while term > Decimal(10) ** -(digits + 5):
            total += term
            term /= k
            k += 1
        return +total


def ffdhe2048_prime() -> int:
    """RFC 7919's ffdhe2048 prime, from its definition:
    p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1 (generator 2)."""
    e = _e(700)  # 2^1918 has 578 decimal digits: 700 leave a wide margin
    with localcontext() as ctx:
        ctx.prec = 720
        scaled = int(Decimal(2**1918) * e)
    return 2**2048 - 2**1984 + (scaled + 560316) * 2**64 - 1


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _der_integer(n: int) -> bytes:
    raw = n.to_bytes(n.bit_length() // 8 + 1, "big")  # a leading 0 keeps it positive
    return b"\x02" + _der_length(len(raw)) + raw


@functools.cache
def ffdhe2048_pem() -> str:
    """The ffdhe2048 group as PKCS#3 `DH PARAMETERS` PEM (what GnuTLS, and QEMU, import)."""
    body = _der_integer(ffdhe2048_prime()) + _der_integer(2)
    der = b"\x30" + _der_length(len(body)) + body
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN DH PARAMETERS-----\n" + "\n".join(lines) + "\n-----END DH PARAMETERS-----\n"
