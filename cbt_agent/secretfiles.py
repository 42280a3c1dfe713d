"""Files holding secrets (API tokens, TLS private keys, NBD pre-shared keys) are checked the way
sshd checks its keys before it reads one: the file belongs to the user this process runs as (or
to root), group and others have no access to it, and the directory holding it is owned by that
user or root and writable by nobody else (whoever can write the directory can replace the file).

The checks are made on what was opened (fstat), not on a name that may change meanwhile. A
failed check raises NotPrivate, whose message names the file and the command that fixes it;
callers add which setting (or option) named the file."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

ROOT_UID = 0


class NotPrivate(Exception):
    """A secret file others may read or replace: the message says which and how to fix it."""


def user_name(uid: int) -> str:
    """The name of `uid` for a chown command, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _trusted(uid: int) -> bool:
    return uid in (os.geteuid(), ROOT_UID)


def file_problem(path: Path | str, st: os.stat_result) -> str | None:
    """Why the file `st` describes (opened as `path`) is not private; None when it is: owned by
    this process's user or root, and no permission bits for group or others."""
    if not _trusted(st.st_uid):
        me = user_name(os.geteuid())
        return (
            f"{path} is owned by {user_name(st.st_uid)}, not by {me} (the user this runs as) "
            f"or root: chown {me} {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return f"{path} is open to group or others (mode {mode:04o}): chmod 600 {path}"
    return None


def _directories(path: Path | str) -> list[str]:
    """The directory named in `path` and, when a symlink leads elsewhere, the real one."""
    named = os.path.dirname(os.path.abspath(path))
    real = os.path.dirname(os.path.realpath(path))
    return [named] if real == named else [named, real]


def directory_problem(path: Path | str) -> str | None:
    """Why the directory holding `path` lets someone else replace it; None when it does not:
    owned by this process's user or root, not writable by group or others (sticky or not)."""
    for directory in _directories(path):
        st = os.stat(directory)
        if not _trusted(st.st_uid):
            me = user_name(os.geteuid())
            return (
                f"{directory}, the directory holding {path}, is owned by "
                f"{user_name(st.st_uid)}, not by {me} or root, who could replace the file: "
                f"chown {me} {directory}, or move the file to a directory of your own"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            return (
                f"{directory}, the directory holding {path}, is writable by group or others "
                f"(mode {mode:04o}), who could replace the file: chmod go-w {directory}, or "
                "move the file to a directory only you can write"
            )
    return None


def _open_checked(path: Path | str) -> int:
    """An fd of `path` once the file and its directory pass; OSError when it cannot be opened,
    NotPrivate when a check fails."""
    # O_NONBLOCK: a FIFO put in its place does not hang the open
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPrivate(f"{path} is not a regular file")
        problem = file_problem(path, st) or directory_problem(path)
        if problem:
            raise NotPrivate(problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(path: Path | str) -> None:
    """Raise NotPrivate unless `path` is a private file in a safe directory (OSError when it
    cannot be opened)."""
    os.close(_open_checked(path))


def read_private(path: Path | str, limit: int) -> bytes:
    """The bytes of `path` once it passes the checks; at most `limit` + 1 are read (a caller
    that gets more than `limit` knows the file is too long). OSError, NotPrivate."""
    fd = _open_checked(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
