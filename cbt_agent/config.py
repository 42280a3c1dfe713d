"""Configuration: a TOML file read into frozen dataclasses, validated with errors naming the key."""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbt_agent.errors import ConfigError

ENV_CONFIG = "CBT_AGENT_CONFIG"
DEFAULT_CONFIG_PATH = Path("/etc/cbt-agent/config.toml")


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 7090
    tokens: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    public_url: str | None = None  # base URL put in job locations; default http://host:port
    webhook_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")  # X-Web-Hook targets


@dataclass(frozen=True)
class NbdConfig:
    listen: str = "127.0.0.1"
    port_first: int = 10501
    port_last: int = 10999


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 16  # live checkpoints per task; older ones are removed oldest first


@dataclass(frozen=True)
class JobsConfig:
    keep_seconds: int = 7 * 24 * 3600  # finished api-job records are kept this long


@dataclass(frozen=True)
class Config:
    api: ApiConfig
    state_dir: Path
    libvirt_uri: str
    qmp_socket_template: str
    nbd: NbdConfig
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    log_level: str = "INFO"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "cbt-agent.db"

    @property
    def scratch_dir(self) -> Path:
        return self.state_dir / "scratch"


_KNOWN: dict[str, set[str]] = {
    "api": {"listen", "tokens", "token_file", "max_body_bytes", "public_url", "webhook_hosts"},
    "state": {"dir"},
    "libvirt": {"uri"},
    "qmp": {"socket_template"},
    "nbd": {"listen", "port_range"},
    "checkpoints": {"keep"},
    "jobs": {"keep_seconds"},
    "log": {"level"},
}


def _table(doc: dict[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "must be a table")
    unknown = set(value) - _KNOWN[name]
    if unknown:
        raise ConfigError(f"{name}.{sorted(unknown)[0]}", "unknown key")
    return value


def _str(t: dict[str, Any], section: str, key: str, default: str | None = None) -> str:
    value = t.get(key, default)
    if value is None:
        raise ConfigError(f"{section}.{key}", "is required")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{section}.{key}", "must be a non-empty string")
    return value


def _int(t: dict[str, Any], section: str, key: str, default: int, lo: int, hi: int) -> int:
    value = t.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{section}.{key}", "must be an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{section}.{key}", f"must be between {lo} and {hi}")
    return value


def _host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"{text!r} is not host:port")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(key, f"port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ConfigError(key, f"port {number} is out of range 1-65535")
    return host, number


def _address(text: str, key: str) -> str:
    if text == "localhost":
        return text
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(key, f"{text!r} is not an IP address") from None
    return text


def _tokens(api: dict[str, Any], base: Path) -> tuple[str, ...]:
    tokens: list[str] = []
    raw = api.get("tokens", [])
    if not isinstance(raw, list) or not all(isinstance(t, str) and t.strip() for t in raw):
        raise ConfigError("api.tokens", "must be a list of non-empty strings")
    tokens.extend(t.strip() for t in raw)
    if "token_file" in api:
        path = Path(_str(api, "api", "token_file"))
        if not path.is_absolute():
            path = base / path
        try:
            st = path.stat()
            text = path.read_text()
        except OSError as e:
            raise ConfigError("api.token_file", f"cannot read {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                "api.token_file", f"{path} must not be readable by others (chmod 600)"
            )
        tokens.extend(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ConfigError("api.tokens", "at least one token is required (tokens or token_file)")
    return tuple(tokens)


def _webhook_hosts(api: dict[str, Any]) -> tuple[str, ...]:
    raw = api.get("webhook_hosts", ["127.0.0.1", "localhost", "::1"])
    if not isinstance(raw, list) or not all(isinstance(h, str) and h.strip() for h in raw):
        raise ConfigError("api.webhook_hosts", "must be a list of host names or addresses")
    return tuple(h.strip().lower() for h in raw)


def parse_config(doc: dict[str, Any], base: Path = Path(".")) -> Config:
    """Build and validate a Config from a parsed TOML document. Raises ConfigError."""
    unknown = set(doc) - set(_KNOWN)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown section")
    api = _table(doc, "api")
    host, port = _host_port(_str(api, "api", "listen", "127.0.0.1:7090"), "api.listen")
    _address(host, "api.listen")
    public_url = api.get("public_url")
    if public_url is not None and (
        not isinstance(public_url, str) or not public_url.startswith(("http://", "https://"))
    ):
        raise ConfigError("api.public_url", "must be an http:// or https:// URL")
    api_cfg = ApiConfig(
        host=host,
        port=port,
        tokens=_tokens(api, base),
        max_body_bytes=_int(api, "api", "max_body_bytes", 1 << 20, 1024, 1 << 30),
        public_url=public_url.rstrip("/") if public_url else None,
        webhook_hosts=_webhook_hosts(api),
    )

    state = _table(doc, "state")
    state_dir = Path(_str(state, "state", "dir", "/var/lib/cbt-agent"))
    if not state_dir.is_absolute():
        state_dir = (base / state_dir).resolve()

    uri = _str(_table(doc, "libvirt"), "libvirt", "uri", "qemu:///system")

    qmp = _table(doc, "qmp")
    template = _str(qmp, "qmp", "socket_template", "/var/lib/libvirt/qemu/zstack/{vm_uuid}.sock")
    if "{vm_uuid}" not in template:
        raise ConfigError("qmp.socket_template", "must contain {vm_uuid}")
    try:
        template.format(vm_uuid="x")
    except (KeyError, IndexError, ValueError):
        raise ConfigError("qmp.socket_template", "only {vm_uuid} may be substituted") from None

    nbd = _table(doc, "nbd")
    listen = _address(_str(nbd, "nbd", "listen", "127.0.0.1"), "nbd.listen")
    port_range = _str(nbd, "nbd", "port_range", "10501:10999")
    first_s, sep, last_s = port_range.partition(":")
    try:
        first, last = int(first_s), int(last_s)
    except ValueError:
        raise ConfigError("nbd.port_range", f"{port_range!r} is not FIRST:LAST") from None
    if not sep or not 1 <= first <= last <= 65535:
        raise ConfigError("nbd.port_range", f"{port_range!r} is not FIRST:LAST within 1-65535")

    cps = _table(doc, "checkpoints")
    jobs = _table(doc, "jobs")
    level = _str(_table(doc, "log"), "log", "level", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", "must be DEBUG, INFO, WARNING or ERROR")
    return Config(
        api=api_cfg,
        state_dir=state_dir,
        libvirt_uri=uri,
        qmp_socket_template=template,
        nbd=NbdConfig(listen=listen, port_first=first, port_last=last),
        checkpoints=CheckpointConfig(keep=_int(cps, "checkpoints", "keep", 16, 1, 1000)),
        jobs=JobsConfig(keep_seconds=_int(jobs, "jobs", "keep_seconds", 7 * 24 * 3600, 60, 10**9)),
        log_level=level,
    )


def load_config(path: Path | None = None) -> Config:
    """Read the config from `path`, $CBT_AGENT_CONFIG, or /etc/cbt-agent/config.toml."""
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        path = Path(env) if env else DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return parse_config(doc, base=path.parent)
