"""NBD exports that need a credential (issue 14.3), without QEMU: the config choice and its
refusals, the pre-shared key files, and the key on the wire and in the client. The real-stack
proof (QEMU refusing clients without the key) is tests/integration/test_nbd_psk.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import stack
from openapi_schema_validator import OAS31Validator

from cbt_agent.api import replies
from cbt_agent.api.openapi import openapi_document
from cbt_agent.client.api import VolumeBackupInfo
from cbt_agent.client.errors import BackupError
from cbt_agent.config import parse_config
from cbt_agent.engine.results import VolumeBackup
from cbt_agent.errors import ConfigError
from cbt_agent.hypervisor.libvirt import DiskInfo
from cbt_agent.qemu import psk
from cbt_agent.qemu.psk import Psk
from cbt_agent.store import NbdServer, SyncStore, VolumeExport

VOL = "b" * 32
TASK = "a" * 32


def _cfg(**nbd: Any) -> dict[str, Any]:
    return {"api": {"tokens": ["test-token-0123456789abcdef"]}, "nbd": nbd}


# ---- config ------------------------------------------------------------------------------------


def test_tls_defaults_to_none_and_to_x509_with_a_cert_dir(tmp_path: Path) -> None:
    assert parse_config(_cfg()).nbd.tls == "none"
    assert parse_config(_cfg(tls="psk", listen="10.0.0.5")).nbd.tls == "psk"
    d = tmp_path / "nbd-tls"
    d.mkdir()
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (d / name).write_text("x")
    os.chmod(d / "server-key.pem", 0o600)
    cfg = parse_config(_cfg(tls_cert_dir=str(d), listen="10.0.0.5"))
    assert (cfg.nbd.tls, cfg.nbd.tls_cert_dir) == ("x509", d)  # configs from before nbd.tls
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(tls="psk", tls_cert_dir=str(d)))
    assert err.value.key == "nbd.tls_cert_dir" and '"x509"' in err.value.reason


@pytest.mark.parametrize(
    ("nbd", "key", "reason"),
    [
        ({"tls": "tls"}, "nbd.tls", '"none", "x509" or "psk"'),
        ({"tls": "x509"}, "nbd.tls", "needs nbd.tls_cert_dir"),
        ({"listen": "0.0.0.0"}, "nbd.listen", 'set nbd.tls = "psk"'),
        ({"listen": "10.0.0.5", "tls": "none"}, "nbd.listen", "not a loopback address"),
        ({"listen": "::"}, "nbd.listen", "read whole disks"),
    ],
)
def test_refusals_name_the_key(nbd: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_cfg(**nbd))
    assert err.value.key == key and reason in err.value.reason, err.value


@pytest.mark.parametrize(
    "nbd",
    [
        {"listen": "127.0.0.1"},
        {"listen": "127.0.0.2"},
        {"listen": "::1"},
        {"listen": "localhost"},
        {"listen": "0.0.0.0", "transport": "unix"},  # TCP is not used at all
        {"listen": "0.0.0.0", "tls": "psk"},
    ],
)
def test_plain_nbd_is_accepted_only_where_strangers_cannot_reach(nbd: dict[str, Any]) -> None:
    parse_config(_cfg(**nbd))


# ---- the key files -----------------------------------------------------------------------------


def test_each_key_is_new_and_well_formed() -> None:
    keys = [Psk.new() for _ in range(50)]
    assert len({k.key for k in keys}) == len({k.identity for k in keys}) == 50
    for k in keys:
        assert Psk.parse(k.line()) == k
        assert k.key not in repr(k)  # never in a log line
    with pytest.raises(ValueError):
        Psk("cbt-x", "00" * 16)  # too short
    with pytest.raises(ValueError):
        Psk("bad:identity", "00" * 32)  # would break the keys.psk line


def test_server_dir_is_private_replaced_and_removed(tmp_path: Path) -> None:
    d = tmp_path / "psk" / TASK
    d.parent.mkdir(mode=0o755)
    first, second = Psk.new(), Psk.new()
    psk.write_server_dir(d, first)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "keys.psk").stat().st_mode) == 0o600
    assert (d / "keys.psk").read_text() == first.line()
    assert psk.read_server_dir(d) == first
    psk.write_server_dir(d, second)  # the next Enable: the old key is gone from the file
    assert (d / "keys.psk").read_text() == second.line()
    assert sorted(os.listdir(d)) == ["dh-params.pem", "keys.psk"]
    assert psk.remove_server_dir(d) is True
    assert not d.exists() and psk.read_server_dir(d) is None
    assert psk.remove_server_dir(d) is False


def test_client_file_lives_only_inside_the_block() -> None:
    key = Psk.new()
    with psk.client_file(key) as path:
        assert Path(path).read_text() == key.line()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert not os.path.exists(path)


def test_dh_params_are_rfc_7919_ffdhe2048() -> None:
    p = psk.ffdhe2048_prime()
    assert p.bit_length() == 2048
    # the published value begins and ends with these words
    assert hex(p).startswith("0xffffffffffffffffadf85458a2bb4a9aafdc5620273d3cf1")
    assert hex(p).endswith("886b423861285c97ffffffffffffffff")
    pem = psk.ffdhe2048_pem()
    assert pem.startswith("-----BEGIN DH PARAMETERS-----\n")
    # OpenSSL names the group it recognises
    if shutil.which("openssl") is None:
        stack.unavailable("openssl is not installed (scripts/setup.sh installs it)")
    r = subprocess.run(
        ["openssl", "pkeyparam", "-text", "-noout"],
        input=pem,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "GROUP: ffdhe2048" in r.stdout, r.stderr


# ---- the store ---------------------------------------------------------------------------------


def test_store_keeps_whether_the_server_takes_a_key(tmp_path: Path) -> None:
    store = SyncStore(tmp_path / "cbt-agent.db")
    try:
        store.create_task(TASK, "n", None, "c" * 32, [VOL])
        for server in (
            NbdServer("127.0.0.1", 10501, None, True, True),
            NbdServer(None, None, "/run/x.sock", True, True),
            NbdServer("127.0.0.1", 10502, None, True),
            NbdServer("127.0.0.1", 10503),
        ):
            store.set_server(TASK, server)
            assert store.nbd_server(TASK) == server
    finally:
        store.close()


# ---- the wire and the client -------------------------------------------------------------------


def _backup(server: NbdServer, key: Psk | None) -> VolumeBackup:
    disk = DiskInfo(VOL, "virtio-disk0", "vda", 0, "/images/v.qcow2", "qcow2", "virtio")
    export = VolumeExport(
        task_uuid=TASK,
        volume_uuid=VOL,
        checkpoint="cbt-0123456789ab-000001",
        device_node="libvirt-1-format",
        scratch_node="cbtsc-x",
        scratch_path="/s/x.qcow2",
        job_id="cbtjob-x",
        export_id="cbtexp-x",
        temp_bitmap=None,
        mode="full",
        since=None,
        reason="first Enable: full",
        size=1 << 20,
        granularity=65536,
        phase="exported",
    )
    return VolumeBackup(disk, export, server, b"\x01\x00", 65536, False, key)


def _conforms(info: dict[str, Any]) -> None:
    doc = openapi_document()
    schema = {"$ref": "#/components/schemas/VolumeCbtBackupInfo", "components": doc["components"]}
    assert [e.message for e in OAS31Validator(schema).iter_errors(info)] == []


def test_the_key_on_the_wire_in_metadata_and_in_the_client() -> None:
    key = Psk.new()
    info = replies.backup_info(_backup(NbdServer("10.0.0.5", 10501, None, True, True), key)).wire()
    assert (info["nbdTls"], info["nbdTlsPskIdentity"], info["nbdTlsPsk"]) == (
        True,
        key.identity,
        key.key,
    )
    meta = json.loads(info["metadata"])  # ZStack's Java SDK users read it there
    assert (meta["nbdTlsPskIdentity"], meta["nbdTlsPsk"]) == (key.identity, key.key)
    _conforms(info)
    parsed = VolumeBackupInfo.from_reply(info)
    assert parsed.nbd_psk == key and parsed.nbd_tls


def test_without_a_key_the_reply_is_as_before() -> None:
    info = replies.backup_info(_backup(NbdServer("127.0.0.1", 10501), None)).wire()
    assert not {"nbdTls", "nbdTlsPskIdentity", "nbdTlsPsk"} & set(info)
    assert not {"nbdTls", "nbdTlsPskIdentity", "nbdTlsPsk"} & set(json.loads(info["metadata"]))
    assert VolumeBackupInfo.from_reply(info).nbd_psk is None


@pytest.mark.parametrize("drop", ["nbdTlsPskIdentity", "nbdTlsPsk", "nbdTls"])
def test_the_client_refuses_half_a_key(drop: str) -> None:
    key = Psk.new()
    info = replies.backup_info(_backup(NbdServer("10.0.0.5", 10501, None, True, True), key)).wire()
    del info[drop]
    with pytest.raises(BackupError, match="half a pre-shared key"):
        VolumeBackupInfo.from_reply(info)


def test_the_client_refuses_a_malformed_key() -> None:
    key = Psk.new()
    info = replies.backup_info(_backup(NbdServer("10.0.0.5", 10501, None, True, True), key)).wire()
    info["nbdTlsPsk"] = "zz" * 32
    with pytest.raises(BackupError, match="malformed"):
        VolumeBackupInfo.from_reply(info)
