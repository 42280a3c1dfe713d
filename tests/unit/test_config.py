"""The config file: defaults, and refusals that name the key and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbt_agent.config import load_config, parse_config
from cbt_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
TOKEN = "config-test-token-0123456789"


def example_copy(tmp_path: Path) -> Path:
    """config.example.toml as an operator makes it usable: its own token, chmod 600."""
    path = tmp_path / "config.toml"
    path.write_text(EXAMPLE.read_text().replace('["change-me"]', f'["{TOKEN}"]'))
    os.chmod(path, 0o600)
    return path


def test_example_config_loads_with_contract_keys(tmp_path: Path) -> None:
    cfg = load_config(example_copy(tmp_path))
    assert (cfg.api.host, cfg.api.port, cfg.api.tokens) == ("127.0.0.1", 7090, (TOKEN,))
    assert cfg.state_dir == Path("/var/lib/cbt-agent")
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.qmp_socket_template == "/var/lib/libvirt/qemu/zstack/{vm_uuid}.sock"
    assert (cfg.nbd.listen, cfg.nbd.port_first, cfg.nbd.port_last) == ("127.0.0.1", 10501, 10999)
    assert cfg.db_path == Path("/var/lib/cbt-agent/cbt-agent.db")
    assert (cfg.checkpoints.quiesce, cfg.checkpoints.freeze_timeout) == ("auto", 10)


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ({"api": {"tokens": []}}, "api.tokens", "at least one token"),
        ({"api": {"tokens": [TOKEN], "listen": "nowhere"}}, "api.listen", "not host:port"),
        ({"api": {"tokens": [TOKEN], "listen": "127.0.0.1:99999"}}, "api.listen", "out of range"),
        ({"api": {"tokens": [TOKEN], "listen": "example.com:80"}}, "api.listen", "not an IP"),
        (
            {"api": {"tokens": [TOKEN]}, "nbd": {"port_range": "10:5"}},
            "nbd.port_range",
            "FIRST:LAST",
        ),
        (
            {"api": {"tokens": [TOKEN]}, "qmp": {"socket_template": "/x.sock"}},
            "qmp.socket_template",
            "{vm_uuid}",
        ),
        ({"api": {"tokens": [TOKEN]}, "checkpoints": {"keep": 0}}, "checkpoints.keep", "between"),
        (
            {"api": {"tokens": [TOKEN]}, "checkpoints": {"quiesce": "sometimes"}},
            "checkpoints.quiesce",
            '"auto", "always" or "never"',
        ),
        (
            {"api": {"tokens": [TOKEN]}, "checkpoints": {"freeze_timeout": 0}},
            "checkpoints.freeze_timeout",
            "between",
        ),
        ({"api": {"tokens": [TOKEN], "colour": "red"}}, "api.colour", "unknown key"),
        ({"api": {"tokens": [TOKEN]}, "extra": {}}, "extra", "unknown section"),
        ({"api": {"tokens": [TOKEN]}, "log": {"level": "LOUD"}}, "log.level", "DEBUG"),
    ],
)
def test_bad_config_names_key_and_reason(doc: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.key == key
    assert reason in err.value.reason


def test_token_file_must_be_private(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha-token-0123456789\n\nbeta-token-0123456789\n")
    os.chmod(tokens, 0o644)
    with pytest.raises(ConfigError) as err:
        parse_config({"api": {"token_file": str(tokens)}})
    assert err.value.key == "api.token_file" and "chmod 600" in err.value.reason
    os.chmod(tokens, 0o600)
    assert parse_config({"api": {"token_file": "tokens"}}, base=tmp_path).api.tokens == (
        "alpha-token-0123456789",
        "beta-token-0123456789",
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[api\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


# ---- least privilege: NBD on unix sockets, NBD TLS, HTTPS ---------------------------------------

BASE = {"api": {"tokens": [TOKEN]}}


def _with(**sections: dict[str, object]) -> dict[str, object]:
    return {**BASE, **sections}


def _openssl_pair(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate and its key (0600), made with the openssl command."""
    import shutil
    import subprocess

    import stack

    if shutil.which("openssl") is None:
        stack.unavailable("openssl is not installed (scripts/setup.sh installs it)")
    cert, key = d / f"{name}-cert.pem", d / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(key, 0o600)
    return cert, key


def test_nbd_defaults_tcp_without_tls(tmp_path: Path) -> None:
    cfg = load_config(example_copy(tmp_path))
    assert (cfg.nbd.transport, cfg.nbd.tls_cert_dir) == ("tcp", None)
    assert cfg.nbd.socket_dir == Path("/var/lib/cbt-agent/nbd")
    assert (cfg.api.tls_cert, cfg.api.tls_key) == (None, None)


def test_nbd_unix_socket_dir_default_and_relative() -> None:
    cfg = parse_config(_with(state={"dir": "/srv/cbt"}, nbd={"transport": "unix"}))
    assert cfg.nbd.transport == "unix"
    assert cfg.nbd.socket_path("a" * 32) == Path(f"/srv/cbt/nbd/{'a' * 32}.sock")
    # relative to the config file's folder (a short fixed one: a socket path has 107 bytes)
    base = Path("/etc/cbt-agent")
    cfg = parse_config(_with(nbd={"transport": "unix", "socket_dir": "run/nbd"}), base=base)
    assert cfg.nbd.socket_dir == base / "run" / "nbd"


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        (_with(nbd={"transport": "vsock"}), "nbd.transport", '"tcp" or "unix"'),
        (_with(nbd={"transport": ""}), "nbd.transport", "non-empty string"),
        (
            _with(nbd={"transport": "unix", "socket_dir": "/" + "d" * 70}),
            "nbd.socket_dir",
            "too long for a unix socket",
        ),
        (
            _with(state={"dir": "/" + "s" * 70}, nbd={"transport": "unix"}),
            "nbd.socket_dir",
            "defaults to <state.dir>/nbd",
        ),
        (
            _with(
                qmp={"socket_template": "/run/zs/{vm_uuid}.sock"},
                nbd={"transport": "unix", "socket_dir": "/run/zs"},
            ),
            "nbd.socket_dir",
            "qmp.socket_template",
        ),
        (_with(nbd={"tls_cert_dir": "/nonexistent/nbd-tls"}), "nbd.tls_cert_dir", "directory"),
        (_with(api={"tokens": [TOKEN], "tls_cert": "/x.pem"}), "api.tls_key", "required"),
        (_with(api={"tokens": [TOKEN], "tls_key": "/x.pem"}), "api.tls_cert", "required"),
        (
            _with(api={"tokens": [TOKEN], "tls_cert": "/nonexistent.pem", "tls_key": "/k.pem"}),
            "api.tls_cert",
            "cannot read /nonexistent.pem",
        ),
    ],
)
def test_bad_privilege_config_names_key(doc: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.key == key
    assert reason in err.value.reason


def test_socket_path_at_the_limit_is_accepted() -> None:
    # <dir>/<32 hex>.sock is exactly 107 bytes
    d = "/" + "d" * (107 - 1 - 1 - 32 - 5)
    cfg = parse_config(_with(nbd={"transport": "unix", "socket_dir": d}))
    assert len(str(cfg.nbd.socket_path("f" * 32))) == 107
    with pytest.raises(ConfigError, match="108 bytes, at most 107"):
        parse_config(_with(nbd={"transport": "unix", "socket_dir": d + "d"}))
    # tcp never makes a socket: no limit
    assert parse_config(_with(nbd={"socket_dir": d + "d" * 50})).nbd.transport == "tcp"


def test_nbd_tls_cert_dir_needs_the_three_files_and_a_private_key(tmp_path: Path) -> None:
    d = tmp_path / "nbd-tls"
    d.mkdir()
    doc = _with(nbd={"tls_cert_dir": "nbd-tls"})
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        with pytest.raises(ConfigError) as err:
            parse_config(doc, base=tmp_path)
        assert err.value.key == "nbd.tls_cert_dir" and f"{d / name}" in err.value.reason
        (d / name).write_text("PEM\n")
        os.chmod(d / name, 0o600)
    assert parse_config(doc, base=tmp_path).nbd.tls_cert_dir == d
    os.chmod(d / "server-key.pem", 0o604)
    with pytest.raises(ConfigError) as err:
        parse_config(doc, base=tmp_path)
    assert err.value.key == "nbd.tls_cert_dir"
    assert f"open to group or others (mode 0604): chmod 600 {d}/server-key.pem" in err.value.reason
    os.chmod(d / "server-key.pem", 0o600)
    (d / "server-cert.pem").unlink()
    (d / "server-cert.pem").mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        parse_config(doc, base=tmp_path)


def test_api_tls_pair_must_load(tmp_path: Path) -> None:
    cert, key = _openssl_pair(tmp_path, "api")
    other_cert, other_key = _openssl_pair(tmp_path, "other")
    cfg = parse_config(_with(api={"tokens": [TOKEN], "tls_cert": "api-cert.pem",
                                  "tls_key": "api-key.pem"}), base=tmp_path)  # fmt: skip
    assert (cfg.api.tls_cert, cfg.api.tls_key) == (cert, key)
    with pytest.raises(ConfigError) as err:  # a key that is not the certificate's
        parse_config(
            _with(api={"tokens": [TOKEN], "tls_cert": str(cert), "tls_key": str(other_key)})
        )
    assert err.value.key == "api.tls_cert" and "does not load" in err.value.reason
    os.chmod(other_cert, 0o600)
    with pytest.raises(ConfigError) as err:  # a certificate given as the key
        parse_config(
            _with(api={"tokens": [TOKEN], "tls_cert": str(cert), "tls_key": str(other_cert)})
        )
    assert err.value.key == "api.tls_cert"
    os.chmod(key, 0o644)
    with pytest.raises(ConfigError) as err:
        parse_config(_with(api={"tokens": [TOKEN], "tls_cert": str(cert), "tls_key": str(key)}))
    assert err.value.key == "api.tls_key" and f"chmod 600 {key}" in err.value.reason
