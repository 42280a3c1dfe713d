"""Configuration: a TOML file read into frozen dataclasses, validated with errors naming the key."""

from __future__ import annotations

import ipaddress
import os
import ssl
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbt_agent.errors import ConfigError
from cbt_agent.secretfiles import NotPrivate, check_private, file_problem, read_private

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
    tls_cert: Path | None = None  # PEM certificate chain: `serve` answers HTTPS
    tls_key: Path | None = None  # its private key
    max_connections: int = 512  # open connections; more get a bare 503 (see api/server.py)
    keepalive_timeout: int = 15  # seconds an idle connection, or a request's headers, may take
    max_jobs_per_caller: int = 512  # api jobs one token may have running at once


# Files QEMU's tls-creds-x509 (endpoint server) reads from [nbd] tls_cert_dir; libnbd, as the
# client, verifies the server against the same directory's ca-cert.pem.
NBD_TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")
# and these when they are there (a CRL; DH parameters, else QEMU generates them, slowly)
NBD_TLS_OPTIONAL_FILES = ("ca-crl.pem", "dh-params.pem")
# sun_path holds 108 bytes including the NUL
UNIX_PATH_MAX = 107
# NBD socket names are <vm_uuid>.sock; ZStack's vmInstanceUuid is 32 hex digits
_VM_UUID_LEN = 32


NBD_TLS_MODES = ("none", "x509", "psk")


@dataclass(frozen=True)
class NbdConfig:
    listen: str = "127.0.0.1"
    port_first: int = 10501
    port_last: int = 10999
    transport: str = "tcp"  # "tcp": listen + port_range; "unix": a socket per VM in socket_dir
    socket_dir: Path = Path("/var/lib/cbt-agent/nbd")
    tls_cert_dir: Path | None = None  # ca-cert.pem, server-cert.pem, server-key.pem
    # what a client must have to read an export: "none" (plain NBD), "x509" (TLS with the
    # server certificate of tls_cert_dir; any client), "psk" (TLS with a pre-shared key made
    # fresh for each Enable and handed out in its reply)
    tls: str = "none"

    def socket_path(self, vm_uuid: str) -> Path:
        return self.socket_dir / f"{vm_uuid}.sock"


QUIESCE_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 16  # live checkpoints per task; older ones are removed oldest first
    # freeze the guest's filesystems (qemu-guest-agent) for the checkpoint transaction:
    # "auto" when the guest has a connected agent, "always" (Enable fails without one), "never"
    quiesce: str = "auto"
    freeze_timeout: int = 10  # seconds a guest may stay frozen before the agent thaws it
    # scratch an open export may use per disk (old data the guest overwrote since the
    # checkpoint): a share of the disk's virtual size, or bytes; past it the export breaks
    scratch_budget: Share = field(default_factory=lambda: Share(fraction=0.25))
    # room always left free on the scratch filesystem: a share of its size, or bytes
    scratch_reserve: Share = field(default_factory=lambda: Share(fraction=0.05))
    # seconds one copy into the scratch may take before the export breaks (the guest's write
    # waits at most this long, then goes on)
    cbw_timeout: int = 10
    scratch_poll: float = 1.0  # seconds between two looks at an open export's scratch


@dataclass(frozen=True)
class Share:
    """A budget: a fraction of some size, or a fixed number of bytes."""

    fraction: float | None = None
    size: int | None = None

    def of(self, total: int) -> int:
        if self.size is not None:
            return self.size
        return int(total * (self.fraction or 0.0))

    def __str__(self) -> str:
        if self.size is not None:
            return str(self.size)
        return f"{(self.fraction or 0.0) * 100:g}%"


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _share(t: dict[str, Any], section: str, key: str, default: Share) -> Share:
    """ "25%" (of a size), "512M" / "20G" (bytes with a binary unit), or an integer of bytes."""
    value = t.get(key)
    if value is None:
        return default
    name = f"{section}.{key}"
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ConfigError(name, "must be at least 1 byte")
        return Share(size=value)
    if not isinstance(value, str):
        raise ConfigError(name, 'must be a percentage ("25%"), a size ("512M", "20G") or bytes')
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 < pct <= 100:
                raise ConfigError(name, f"{value!r}: a percentage must be above 0 and at most 100")
            return Share(fraction=pct / 100)
        unit = text[-1:] if text[-1:] in _UNITS else ""
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        raise ConfigError(
            name, f'{value!r} is not a percentage ("25%"), a size ("512M", "20G") or bytes'
        ) from None
    size = int(number * _UNITS[unit])
    if size < 1:
        raise ConfigError(name, f"{value!r} must be at least 1 byte")
    return Share(size=size)


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
    log_access: bool = False  # one line per API request (off: it costs throughput)

    @property
    def db_path(self) -> Path:
        return self.state_dir / "cbt-agent.db"

    @property
    def scratch_dir(self) -> Path:
        return self.state_dir / "scratch"

    @property
    def psk_dir(self) -> Path:
        """Where each task's NBD pre-shared key lives while it has exports ([nbd] tls = psk)."""
        return self.state_dir / "nbd-psk"

    @property
    def tls_copy_dir(self) -> Path:
        """Where a VM's QEMU is handed its private copy of [nbd] tls_cert_dir, for the moment
        its tls-creds-x509 object is made ([nbd] tls = x509)."""
        return self.state_dir / "nbd-tls"


_KNOWN: dict[str, set[str]] = {
    "api": {
        "listen",
        "tokens",
        "token_file",
        "max_body_bytes",
        "public_url",
        "webhook_hosts",
        "tls_cert",
        "tls_key",
        "max_connections",
        "keepalive_timeout",
        "max_jobs_per_caller",
    },
    "state": {"dir"},
    "libvirt": {"uri"},
    "qmp": {"socket_template"},
    "nbd": {"listen", "port_range", "transport", "socket_dir", "tls_cert_dir", "tls"},
    "checkpoints": {
        "keep",
        "quiesce",
        "freeze_timeout",
        "scratch_budget",
        "scratch_reserve",
        "cbw_timeout",
        "scratch_poll",
    },
    "jobs": {"keep_seconds"},
    "log": {"level", "access"},
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


# The token config.example.toml shows: a copy of the example must not start with it.
EXAMPLE_TOKEN = "change-me"
MIN_TOKEN_LEN = 16  # `openssl rand -hex 32` gives 64
MAX_TOKEN_FILE = 1 << 20
HOW_TO_MAKE_A_TOKEN = "generate one with `openssl rand -hex 32`"


def _token_problem(token: str) -> str | None:
    """Why `token` may not be used (the token itself is never put in the message)."""
    if token == EXAMPLE_TOKEN:
        return f"is the example token of config.example.toml: {HOW_TO_MAKE_A_TOKEN}"
    if len(token) < MIN_TOKEN_LEN:
        return (
            f"has {len(token)} characters, fewer than {MIN_TOKEN_LEN} (too easy to guess): "
            f"{HOW_TO_MAKE_A_TOKEN}"
        )
    return None


def _tokens(api: dict[str, Any], base: Path, config_exposed: str | None) -> tuple[str, ...]:
    tokens: list[str] = []
    raw = api.get("tokens", [])
    if not isinstance(raw, list) or not all(isinstance(t, str) and t.strip() for t in raw):
        raise ConfigError("api.tokens", "must be a list of non-empty strings")
    for number, token in enumerate(raw, 1):
        problem = _token_problem(token.strip())
        if problem:
            raise ConfigError("api.tokens", f"token {number} {problem}")
    if raw and config_exposed:
        raise ConfigError(
            "api.tokens",
            f"tokens in the config need a private config file, and {config_exposed}; or move "
            "the tokens to api.token_file (a file of their own, chmod 600)",
        )
    tokens.extend(t.strip() for t in raw)
    if "token_file" in api:
        path = Path(_str(api, "api", "token_file"))
        if not path.is_absolute():
            path = base / path
        try:
            data = read_private(path, MAX_TOKEN_FILE)
        except OSError as e:
            raise ConfigError("api.token_file", f"cannot read {path}: {e.strerror}") from None
        except NotPrivate as e:
            raise ConfigError("api.token_file", f"a file of tokens must be private: {e}") from None
        if len(data) > MAX_TOKEN_FILE:
            raise ConfigError("api.token_file", f"{path} is larger than {MAX_TOKEN_FILE} bytes")
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ConfigError("api.token_file", f"{path} is not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), 1):
            token = line.strip()
            if not token:
                continue
            problem = _token_problem(token)
            if problem:
                raise ConfigError(
                    "api.token_file", f"the token on line {number} of {path} {problem}"
                )
            tokens.append(token)
    if not tokens:
        raise ConfigError(
            "api.tokens",
            f"at least one token is required (tokens or token_file): {HOW_TO_MAKE_A_TOKEN}",
        )
    return tuple(tokens)


def _webhook_hosts(api: dict[str, Any]) -> tuple[str, ...]:
    raw = api.get("webhook_hosts", ["127.0.0.1", "localhost", "::1"])
    if not isinstance(raw, list) or not all(isinstance(h, str) and h.strip() for h in raw):
        raise ConfigError("api.webhook_hosts", "must be a list of host names or addresses")
    return tuple(h.strip().lower() for h in raw)


def _path(t: dict[str, Any], section: str, key: str, base: Path) -> Path:
    path = Path(_str(t, section, key))
    return path if path.is_absolute() else (base / path).resolve()


def _readable_file(path: Path, key: str, private: bool = False) -> None:
    """`path` is a file this process can read; with `private` (a private key) also one only
    its owner, this process's user or root, can read, in a directory nobody else can write."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"{path} is not a file")
        if private:
            check_private(path)
        else:
            with path.open("rb"):
                pass
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}") from None
    except NotPrivate as e:
        raise ConfigError(key, f"a private key must be private: {e}") from None


def _api_tls(api: dict[str, Any], base: Path) -> tuple[Path | None, Path | None]:
    """[api] tls_cert + tls_key: both or neither; the pair must load as a server certificate."""
    if "tls_cert" not in api and "tls_key" not in api:
        return None, None
    if "tls_key" not in api:
        raise ConfigError("api.tls_key", "is required with api.tls_cert")
    if "tls_cert" not in api:
        raise ConfigError("api.tls_cert", "is required with api.tls_key")
    cert = _path(api, "api", "tls_cert", base)
    key = _path(api, "api", "tls_key", base)
    _readable_file(cert, "api.tls_cert")
    _readable_file(key, "api.tls_key", private=True)
    try:
        server_ssl_context(cert, key)
    except ssl.SSLError as e:
        raise ConfigError(
            "api.tls_cert", f"{cert} with key {key} does not load as a certificate chain: {e}"
        ) from None
    return cert, key


def server_ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The HTTPS context of `serve`: TLS 1.2 or later, the configured chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _nbd_tls_dir(nbd: dict[str, Any], base: Path) -> Path | None:
    if "tls_cert_dir" not in nbd:
        return None
    path = _path(nbd, "nbd", "tls_cert_dir", base)
    if not path.is_dir():
        raise ConfigError("nbd.tls_cert_dir", f"{path} is not a directory")
    for name in NBD_TLS_FILES:
        _readable_file(path / name, "nbd.tls_cert_dir", private=name == "server-key.pem")
    return path


def _nbd_tls(nbd: dict[str, Any], cert_dir: Path | None) -> str:
    """[nbd] tls; without it "x509" when tls_cert_dir is set (as before the key existed), else
    "none"."""
    mode = _str(nbd, "nbd", "tls", "x509" if cert_dir is not None else "none")
    if mode not in NBD_TLS_MODES:
        raise ConfigError("nbd.tls", f'{mode!r} is not "none", "x509" or "psk"')
    if mode == "x509" and cert_dir is None:
        raise ConfigError("nbd.tls", '"x509" needs nbd.tls_cert_dir (the server certificate)')
    if mode != "x509" and cert_dir is not None:
        raise ConfigError(
            "nbd.tls_cert_dir", f'is used only with nbd.tls = "x509", not {mode!r}: remove one'
        )
    return mode


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _refuse_open_plain_nbd(nbd: NbdConfig) -> None:
    """Plain NBD authenticates nobody: whoever reaches the port during an export reads the whole
    disk. Only a loopback address (or a unix socket) keeps strangers out without TLS."""
    if nbd.transport == "tcp" and nbd.tls == "none" and not is_loopback(nbd.listen):
        raise ConfigError(
            "nbd.listen",
            f"{nbd.listen} is not a loopback address, and exports without TLS let anyone who "
            'reaches it read whole disks: set nbd.tls = "psk" (a fresh key handed out with '
            'each Enable), or listen on 127.0.0.1, or use nbd.transport = "unix"',
        )


def parse_config(
    doc: dict[str, Any], base: Path = Path("."), *, exposed: str | None = None
) -> Config:
    """Build and validate a Config from a parsed TOML document. Raises ConfigError.

    `exposed`: why the file `doc` was read from is not private (load_config passes it); inline
    api.tokens are then refused. A document that came from no file (None) keeps its tokens:
    the caller holds them in memory anyway."""
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
    tls_cert, tls_key = _api_tls(api, base)
    api_cfg = ApiConfig(
        host=host,
        port=port,
        tokens=_tokens(api, base, exposed),
        max_body_bytes=_int(api, "api", "max_body_bytes", 1 << 20, 1024, 1 << 30),
        public_url=public_url.rstrip("/") if public_url else None,
        webhook_hosts=_webhook_hosts(api),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_connections=_int(api, "api", "max_connections", 512, 8, 100_000),
        keepalive_timeout=_int(api, "api", "keepalive_timeout", 15, 1, 3600),
        max_jobs_per_caller=_int(api, "api", "max_jobs_per_caller", 512, 1, 100_000),
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
    transport = _str(nbd, "nbd", "transport", "tcp")
    if transport not in ("tcp", "unix"):
        raise ConfigError("nbd.transport", f'{transport!r} is not "tcp" or "unix"')
    socket_dir = _path(nbd, "nbd", "socket_dir", base) if "socket_dir" in nbd else state_dir / "nbd"
    tls_cert_dir = _nbd_tls_dir(nbd, base)
    nbd_cfg = NbdConfig(
        listen=listen,
        port_first=first,
        port_last=last,
        transport=transport,
        socket_dir=socket_dir,
        tls_cert_dir=tls_cert_dir,
        tls=_nbd_tls(nbd, tls_cert_dir),
    )
    _refuse_open_plain_nbd(nbd_cfg)
    if transport == "unix":
        longest = nbd_cfg.socket_path("0" * _VM_UUID_LEN)
        if len(os.fsencode(longest)) > UNIX_PATH_MAX:
            raise ConfigError(
                "nbd.socket_dir",
                f"{socket_dir} is too long for a unix socket: {longest} has "
                f"{len(os.fsencode(longest))} bytes, at most {UNIX_PATH_MAX} fit"
                + ("" if "socket_dir" in nbd else " (it defaults to <state.dir>/nbd)"),
            )
        if str(nbd_cfg.socket_path("{vm_uuid}")) == str(Path(template)):
            raise ConfigError(
                "nbd.socket_dir", "must differ from the directory of qmp.socket_template"
            )

    cps = _table(doc, "checkpoints")
    jobs = _table(doc, "jobs")
    log_cfg = _table(doc, "log")
    level = _str(log_cfg, "log", "level", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("log.level", "must be DEBUG, INFO, WARNING or ERROR")
    access = log_cfg.get("access", False)
    if not isinstance(access, bool):
        raise ConfigError("log.access", "must be true or false")
    return Config(
        api=api_cfg,
        state_dir=state_dir,
        libvirt_uri=uri,
        qmp_socket_template=template,
        nbd=nbd_cfg,
        checkpoints=CheckpointConfig(
            keep=_int(cps, "checkpoints", "keep", 16, 1, 1000),
            quiesce=_quiesce(cps),
            freeze_timeout=_int(cps, "checkpoints", "freeze_timeout", 10, 1, 600),
            scratch_budget=_share(cps, "checkpoints", "scratch_budget", Share(fraction=0.25)),
            scratch_reserve=_share(cps, "checkpoints", "scratch_reserve", Share(fraction=0.05)),
            cbw_timeout=_int(cps, "checkpoints", "cbw_timeout", 10, 1, 600),
            scratch_poll=_poll(cps),
        ),
        jobs=JobsConfig(keep_seconds=_int(jobs, "jobs", "keep_seconds", 7 * 24 * 3600, 60, 10**9)),
        log_level=level,
        log_access=access,
    )


def _poll(cps: dict[str, Any]) -> float:
    value = cps.get("scratch_poll", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError("checkpoints.scratch_poll", "must be a number of seconds")
    if not 0.05 <= value <= 60:
        raise ConfigError("checkpoints.scratch_poll", "must be between 0.05 and 60")
    return float(value)


def _quiesce(cps: dict[str, Any]) -> str:
    mode = _str(cps, "checkpoints", "quiesce", "auto")
    if mode not in QUIESCE_MODES:
        raise ConfigError("checkpoints.quiesce", f'{mode!r} is not "auto", "always" or "never"')
    return mode


def load_config(path: Path | None = None) -> Config:
    """Read the config from `path`, $CBT_AGENT_CONFIG, or /etc/cbt-agent/config.toml. Inline
    api.tokens are accepted only from a private file (owned by this process's user or root, no
    access for group or others)."""
    if path is None:
        env = os.environ.get(ENV_CONFIG)
        path = Path(env) if env else DEFAULT_CONFIG_PATH
    try:
        with path.open("rb") as f:
            exposed = file_problem(path, os.fstat(f.fileno()))  # of what was opened
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file not found") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return parse_config(doc, base=path.parent, exposed=exposed)
