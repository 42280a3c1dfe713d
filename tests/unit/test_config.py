"""The config file: defaults, and refusals that name the key and the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbt_agent.config import load_config, parse_config
from cbt_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def test_example_config_loads_with_contract_keys() -> None:
    cfg = load_config(EXAMPLE)
    assert (cfg.api.host, cfg.api.port, cfg.api.tokens) == ("127.0.0.1", 7090, ("change-me",))
    assert cfg.state_dir == Path("/var/lib/cbt-agent")
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.qmp_socket_template == "/var/lib/libvirt/qemu/zstack/{vm_uuid}.sock"
    assert (cfg.nbd.listen, cfg.nbd.port_first, cfg.nbd.port_last) == ("127.0.0.1", 10501, 10999)
    assert cfg.db_path == Path("/var/lib/cbt-agent/cbt-agent.db")


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ({"api": {"tokens": []}}, "api.tokens", "at least one token"),
        ({"api": {"tokens": ["t"], "listen": "nowhere"}}, "api.listen", "not host:port"),
        ({"api": {"tokens": ["t"], "listen": "127.0.0.1:99999"}}, "api.listen", "out of range"),
        ({"api": {"tokens": ["t"], "listen": "example.com:80"}}, "api.listen", "not an IP"),
        ({"api": {"tokens": ["t"]}, "nbd": {"port_range": "10:5"}}, "nbd.port_range", "FIRST:LAST"),
        (
            {"api": {"tokens": ["t"]}, "qmp": {"socket_template": "/x.sock"}},
            "qmp.socket_template",
            "{vm_uuid}",
        ),
        ({"api": {"tokens": ["t"]}, "checkpoints": {"keep": 0}}, "checkpoints.keep", "between"),
        ({"api": {"tokens": ["t"], "colour": "red"}}, "api.colour", "unknown key"),
        ({"api": {"tokens": ["t"]}, "extra": {}}, "extra", "unknown section"),
        ({"api": {"tokens": ["t"]}, "log": {"level": "LOUD"}}, "log.level", "DEBUG"),
    ],
)
def test_bad_config_names_key_and_reason(doc: dict[str, object], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert err.value.key == key
    assert reason in err.value.reason


def test_token_file_must_be_private(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha\n\nbeta\n")
    os.chmod(tokens, 0o644)
    with pytest.raises(ConfigError) as err:
        parse_config({"api": {"token_file": str(tokens)}})
    assert err.value.key == "api.token_file" and "chmod 600" in err.value.reason
    os.chmod(tokens, 0o600)
    assert parse_config({"api": {"token_file": "tokens"}}, base=tmp_path).api.tokens == (
        "alpha",
        "beta",
    )


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[api\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
