"""Secrets are checked like sshd checks them (issue 14.5): token files, TLS private keys, NBD
pre-shared keys and a config holding tokens belong to the agent's user (or root), are open to
nobody else, and sit in a directory nobody else can write; the example token and short tokens
are refused. Every refusal names the setting and says what to run, never the token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import stack

from cbt_agent.client.auth import TokenError, read_token_file
from cbt_agent.config import load_config, parse_config
from cbt_agent.engine.exports import export_psk, psk_dir
from cbt_agent.errors import ConfigError, OperationError
from cbt_agent.qemu import psk
from cbt_agent.qemu.psk import Psk
from cbt_agent.secretfiles import NotPrivate
from cbt_agent.store import NbdServer

GOOD = "0123456789abcdef0123456789abcdef"  # 32 characters, as `openssl rand -hex 16` gives
NOBODY = 65534


@pytest.fixture
def root() -> None:
    """chown to another user needs root: without it the test cannot run (a failure under CI,
    where the suite runs as root; skipped elsewhere, saying so, through stack.unavailable)."""
    if os.geteuid() != 0:
        stack.unavailable("chown to another user needs root")


as_root = pytest.mark.usefixtures("root")


def secret_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir(mode=0o700)
    return d


def token_file(d: Path, text: str = GOOD + "\n", mode: int = 0o600) -> Path:
    path = d / "tokens"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def refusal(doc: dict[str, object], base: Path = Path(".")) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        parse_config(doc, base=base)
    return err.value


def config_file(d: Path, tokens: list[str], mode: int = 0o600) -> Path:
    path = d / "config.toml"
    path.write_text(f"[api]\ntokens = {tokens!r}\n".replace("'", '"'))
    os.chmod(path, mode)
    return path


# ---- the token file --------------------------------------------------------------------------


def test_a_group_readable_token_file_is_refused(tmp_path: Path) -> None:
    path = token_file(secret_dir(tmp_path), mode=0o640)
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file"
    assert f"open to group or others (mode 0640): chmod 600 {path}" in err.reason
    assert GOOD not in str(err)


@as_root
def test_a_token_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = token_file(secret_dir(tmp_path))
    os.chown(path, NOBODY, NOBODY)
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file"
    assert f"{path} is owned by nobody" in err.reason and f"chown root {path}" in err.reason


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o757], ids=oct)
def test_a_token_file_in_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    d = secret_dir(tmp_path)
    path = token_file(d)
    os.chmod(d, mode)  # sticky or not: kept simple, refused
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file"
    assert f"{d}, the directory holding {path}, is writable by group or others" in err.reason
    assert f"chmod go-w {d}" in err.reason


@as_root
def test_a_token_file_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = secret_dir(tmp_path)
    path = token_file(d)
    os.chown(d, NOBODY, NOBODY)
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file" and f"chown root {d}" in err.reason


def test_a_symlinked_token_file_is_judged_where_it_really_lives(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    real = token_file(shared)
    link = secret_dir(tmp_path) / "tokens"
    link.symlink_to(real)
    err = refusal({"api": {"token_file": str(link)}})
    assert err.key == "api.token_file" and f"chmod go-w {shared}" in err.reason


# ---- tokens in the config file ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_inline_tokens_in_a_config_others_can_read_are_refused(tmp_path: Path, mode: int) -> None:
    path = config_file(secret_dir(tmp_path), [GOOD], mode)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "api.tokens"
    assert f"chmod 600 {path}" in err.value.reason and "api.token_file" in err.value.reason
    assert GOOD not in str(err.value)


@as_root
def test_inline_tokens_in_a_config_of_another_user_are_refused(tmp_path: Path) -> None:
    path = config_file(secret_dir(tmp_path), [GOOD])
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == "api.tokens" and f"chown root {path}" in err.value.reason


def test_a_config_others_can_read_is_fine_without_inline_tokens(tmp_path: Path) -> None:
    d = secret_dir(tmp_path)
    token_file(d)
    config = d / "config.toml"
    config.write_text('[api]\ntoken_file = "tokens"\n')
    os.chmod(config, 0o644)
    assert load_config(config).api.tokens == (GOOD,)


def test_a_document_from_no_file_keeps_its_inline_tokens() -> None:
    # parse_config of a dict built in memory (tests, embedding): there is no file to expose
    assert parse_config({"api": {"tokens": [GOOD]}}).api.tokens == (GOOD,)


# ---- the tokens themselves --------------------------------------------------------------------


def test_the_example_token_is_refused_without_being_echoed(tmp_path: Path) -> None:
    err = refusal({"api": {"tokens": [GOOD, "change-me"]}})
    assert err.key == "api.tokens"
    assert "token 2 is the example token" in err.reason
    assert "openssl rand -hex 32" in err.reason and "change-me" not in str(err)
    path = token_file(secret_dir(tmp_path), f"{GOOD}\n\nchange-me\n")
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file"
    assert f"line 3 of {path} is the example token" in err.reason
    assert "change-me" not in str(err)


def test_a_copy_of_the_example_config_says_how_to_fix_it(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config.example.toml"
    copy = secret_dir(tmp_path) / "config.toml"
    copy.write_text(example.read_text())
    os.chmod(copy, 0o600)  # as scripts/install.sh installs it
    with pytest.raises(ConfigError) as err:
        load_config(copy)
    assert err.value.key == "api.tokens"
    assert "example token" in err.value.reason and "openssl rand -hex 32" in err.value.reason


def test_a_token_of_15_characters_is_refused_16_accepted(tmp_path: Path) -> None:
    short = "s" * 15
    err = refusal({"api": {"tokens": [short]}})
    assert err.key == "api.tokens"
    assert "token 1 has 15 characters, fewer than 16" in err.reason
    assert short not in str(err)
    path = token_file(secret_dir(tmp_path), short + "\n")
    err = refusal({"api": {"token_file": str(path)}})
    assert err.key == "api.token_file" and "has 15 characters" in err.reason
    assert short not in str(err)
    assert parse_config({"api": {"tokens": ["s" * 16]}}).api.tokens == ("s" * 16,)


# ---- a good setup -----------------------------------------------------------------------------


def test_a_private_setup_loads(tmp_path: Path) -> None:
    d = secret_dir(tmp_path)
    os.chmod(d, 0o755)  # others may list /etc/cbt-agent; only its owner writes it
    other = "fedcba9876543210fedcba9876543210"
    token_file(d, f"{other}\n")
    config = d / "config.toml"
    config.write_text(f'[api]\ntokens = ["{GOOD}"]\ntoken_file = "tokens"\n')
    os.chmod(config, 0o600)
    assert load_config(config).api.tokens == (GOOD, other)


# ---- TLS private keys -------------------------------------------------------------------------


def _nbd_tls_dir(tmp_path: Path) -> Path:
    d = tmp_path / "nbd-tls"
    d.mkdir(mode=0o755)
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (d / name).write_text("PEM\n")
    os.chmod(d / "server-key.pem", 0o600)
    return d


def test_a_group_readable_nbd_server_key_is_refused(tmp_path: Path) -> None:
    d = _nbd_tls_dir(tmp_path)
    doc = {"api": {"tokens": [GOOD]}, "nbd": {"tls_cert_dir": str(d)}}
    assert parse_config(doc).nbd.tls_cert_dir == d
    os.chmod(d / "server-key.pem", 0o640)  # the old check let group-readable keys through
    err = refusal(doc)
    assert err.key == "nbd.tls_cert_dir"
    assert f"chmod 600 {d / 'server-key.pem'}" in err.reason
    os.chmod(d / "server-key.pem", 0o600)
    os.chmod(d, 0o775)
    err = refusal(doc)
    assert err.key == "nbd.tls_cert_dir" and f"chmod go-w {d}" in err.reason


@as_root
def test_an_api_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "api-key.pem"
    key.write_text("PEM\n")
    os.chmod(key, 0o600)
    os.chown(key, NOBODY, NOBODY)
    err = refusal({"api": {"tokens": [GOOD], "tls_cert": str(key), "tls_key": str(key)}})
    assert err.key == "api.tls_key" and f"chown root {key}" in err.reason


# ---- NBD pre-shared keys ----------------------------------------------------------------------

TASK = "a" * 32


async def test_a_pre_shared_key_others_can_read_is_not_handed_out(tmp_path: Path) -> None:
    cfg = parse_config({"api": {"tokens": [GOOD]}, "state": {"dir": str(tmp_path / "state")}})
    d = psk_dir(cfg, TASK)
    key = Psk.new()
    psk.write_server_dir(d, key)
    server = NbdServer("127.0.0.1", 10501, None, tls=True, psk=True)
    assert await export_psk(cfg, server, TASK) == key
    os.chmod(d / psk.KEYS_FILE, 0o644)
    with pytest.raises(NotPrivate, match="chmod 600"):
        psk.read_server_dir(d)
    with pytest.raises(OperationError) as err:
        await export_psk(cfg, server, TASK)
    assert "Disable and Enable again" in err.value.message
    assert key.key not in err.value.message
    os.chmod(d / psk.KEYS_FILE, 0o600)
    os.chmod(d, 0o733)
    with pytest.raises(OperationError, match="chmod go-w"):
        await export_psk(cfg, server, TASK)


# ---- the client's --token-file ----------------------------------------------------------------


def test_the_clients_token_file_needs_a_directory_only_its_user_writes(tmp_path: Path) -> None:
    d = secret_dir(tmp_path)
    path = token_file(d)
    assert read_token_file(path) == GOOD
    os.chmod(d, 0o1777)  # like /tmp: anyone may put a file of their own there
    with pytest.raises(TokenError) as err:
        read_token_file(path)
    assert f"--token-file {path}" in str(err.value) and f"chmod go-w {d}" in str(err.value)
    os.chmod(d, 0o700)
    os.chmod(path, 0o640)
    with pytest.raises(TokenError, match=f"chmod 600 {path}"):
        read_token_file(path)
