"""The configuration reference stays true: README's table and config.example.toml name exactly
the keys the code reads, with the defaults the code uses."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbt_agent.config import _KNOWN, Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
CODE_KEYS = {f"{section}.{key}" for section, keys in _KNOWN.items() for key in keys}


def readme_table() -> dict[str, str]:
    """key -> default cell of README's Configuration table ("a / b" rows give both keys)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"\| (`[a-z_.]+`(?: / `[a-z_.]+`)*) \| ([^|]*) \|", line)
        if m:
            for key in re.findall(r"`([a-z_.]+)`", m.group(1)):
                rows[key] = m.group(2).strip()
    return rows


def example_keys() -> set[str]:
    """Every key config.example.toml shows, set or commented out."""
    keys: set[str] = set()
    section = ""
    for line in (ROOT / "config.example.toml").read_text().splitlines():
        if m := re.match(r"^\[([a-z]+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#? ?([a-z_]+) = ", line):
            keys.add(f"{section}.{m.group(1)}")
    return keys


def test_the_readme_and_the_example_name_every_key_and_no_other() -> None:
    assert set(readme_table()) == CODE_KEYS
    assert example_keys() == CODE_KEYS


# README's default cell -> what the code holds without the key (keys with no plain default,
# such as api.tokens or a path derived from another key, are read from the text of the row)
DEFAULTS: dict[str, Callable[[Config], Any]] = {
    "api.listen": lambda c: f"`{c.api.host}:{c.api.port}`",
    "api.max_body_bytes": lambda c: f"{c.api.max_body_bytes >> 20} MiB",
    "api.max_connections": lambda c: str(c.api.max_connections),
    "api.keepalive_timeout": lambda c: str(c.api.keepalive_timeout),
    "api.max_jobs_per_caller": lambda c: str(c.api.max_jobs_per_caller),
    "state.dir": lambda c: f"`{c.state_dir}`",
    "libvirt.uri": lambda c: f"`{c.libvirt_uri}`",
    "qmp.socket_template": lambda c: f"`{c.qmp_socket_template}`",
    "nbd.listen": lambda c: f"`{c.nbd.listen}`",
    "nbd.port_range": lambda c: f"`{c.nbd.port_first}:{c.nbd.port_last}`",
    "nbd.transport": lambda c: f"`{c.nbd.transport}`",
    "checkpoints.keep": lambda c: str(c.checkpoints.keep),
    "checkpoints.quiesce": lambda c: f'`"{c.checkpoints.quiesce}"`',
    "checkpoints.freeze_timeout": lambda c: f"{c.checkpoints.freeze_timeout:g}",
    "jobs.keep_seconds": lambda c: str(c.jobs.keep_seconds),
    "log.level": lambda c: f"`{c.log_level}`",
    "log.access": lambda c: f"`{str(c.log_access).lower()}`",
}


def test_the_readme_defaults_are_the_codes() -> None:
    config = parse_config({"api": {"tokens": ["a-token-of-sixteen-or-more"]}})
    table = readme_table()
    assert {key: table[key] for key in DEFAULTS} == {k: f(config) for k, f in DEFAULTS.items()}
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    for key, value in (
        ("api.listen", f"{config.api.host}:{config.api.port}"),
        ("state.dir", str(config.state_dir)),
        ("nbd.port_range", f"{config.nbd.port_first}:{config.nbd.port_last}"),
        ("checkpoints.keep", config.checkpoints.keep),
        ("checkpoints.quiesce", config.checkpoints.quiesce),
        ("jobs.keep_seconds", config.jobs.keep_seconds),
    ):
        section, name = key.split(".")
        assert example[section][name] == value, key
