"""Where the backup client's session token comes from: `$CBT_AGENT_TOKEN` or a file only its
owner can read (`--token-file`, checked as sshd checks a key), never the command line, which
every user of the host can read in `ps` (and /proc/<pid>/cmdline) while the backup runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cbt_agent.client.errors import BackupError
from cbt_agent.secretfiles import NotPrivate, read_private

TOKEN_ENV = "CBT_AGENT_TOKEN"
MAX_TOKEN = 4096
HOW = f"set ${TOKEN_ENV}, or pass --token-file FILE (a file only you can read: chmod 600)"


class TokenError(BackupError):
    """No usable token: the message says where to put one."""


def read_token_file(path: Path) -> str:
    """The token in `path`: one line, in a file owned by this user (or root) that group and
    others cannot access, in a directory nobody else can write (see secretfiles)."""
    try:
        data = read_private(path, MAX_TOKEN)
    except OSError as e:
        raise TokenError(f"--token-file {path}: cannot open it: {e.strerror}") from None
    except NotPrivate as e:
        raise TokenError(f"--token-file {path}: a token file must be yours alone: {e}") from None
    try:
        token = data.decode().strip()
    except UnicodeDecodeError:
        raise TokenError(f"--token-file {path}: not text") from None
    if len(data) > MAX_TOKEN or not _is_token(token):
        raise TokenError(f"--token-file {path}: must hold one token on one line")
    return token


def _is_token(token: str) -> bool:
    # it goes into an HTTP header: printable, no spaces
    return bool(token) and token.isprintable() and not any(c.isspace() for c in token)


def session_token(token_file: str | None, environ: Mapping[str, str]) -> str:
    """The token from `--token-file` when given, else from $CBT_AGENT_TOKEN; TokenError saying
    what to do when there is none."""
    if token_file is not None:
        return read_token_file(Path(token_file))
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise TokenError(f"backup needs the agent's session token: {HOW}")
    if len(token) > MAX_TOKEN or not _is_token(token):
        raise TokenError(f"${TOKEN_ENV} must hold one token: no spaces or control characters")
    return token


def refuse_command_line_token() -> TokenError:
    """What `--token` gets: the reason, and what to use instead."""
    return TokenError(f"--token is refused: a token on the command line shows in ps; {HOW}")
