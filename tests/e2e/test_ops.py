"""The operator commands against real VMs, as a person on the host runs them: `checkpoints`
flags a bitmap removed behind the agent's back (read through libvirt while the agent runs,
through the VM's QMP socket once it is down, from the image files once the VM is off), and a
top image made without tracking; `sweep` lists planted strays and removes them only with
`--apply`, never while the agent runs. Every process a test starts it stops by pid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import chainops
import pytest
import stack
from agentproc import AgentProcess

pytestmark = pytest.mark.stack


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cbt-agent ARGS --config CONFIG` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "cbt_agent", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


async def start_task(agent: AgentProcess, vm_uuid: str) -> str:
    status, body = await agent.call(
        "POST", "/cbt-task/create", {"params": {"name": "ops", "vmInstanceUuid": vm_uuid}}
    )
    assert status == 200, body
    return str(body["inventory"]["uuid"])


async def enable(agent: AgentProcess, task: str) -> list[dict[str, Any]]:
    status, body = await agent.call("POST", f"/cbt-task/enable/{task}", {"params": {}})
    assert status == 200, body
    return list(body["volumeCbtBackupInfos"])


async def disable(agent: AgentProcess, task: str) -> None:
    status, body = await agent.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
    assert status == 200, body


def flagged(disk: dict[str, Any]) -> list[tuple[int | None, str, str, list[str]]]:
    return [(b["layer"], b["name"], b["state"], b["flags"]) for b in disk["bitmaps"] if b["flags"]]


async def test_checkpoints_flags_a_bitmap_removed_behind_the_agents_back(
    vm_factory: Callable[..., stack.TestVm],
    agent_process: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    v0, v1 = (v.volume_uuid for v in vm.volumes)
    agent = agent_process("12300:12349")
    await agent.start()
    task = await start_task(agent, vm.vm_uuid)
    first = (await enable(agent, task))[0]["bitmapName"]
    await vm.write(v0, 0, 65536, 0x11)
    await disable(agent, task)
    infos = await enable(agent, task)  # left Running: an export open, the filter on the disks
    second = infos[0]["bitmapName"]
    assert infos[0]["mode"] == "incremental"

    # agent up: its QMP socket is held, so the command reads through libvirt
    out = run(agent.config, "checkpoints", vm.vm_uuid, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = as_json(out)
    assert (report["source"], report["agent"]["running"], report["consistent"]) == (
        "qmp-libvirt",
        True,
        True,
    )
    assert report["task"]["uuid"] == task and report["task"]["status"] == "Running"
    d0 = report["disks"][0]
    assert d0["volumeUuid"] == v0 and d0["layers"][0]["image"] == str(vm.volumes[0].path)
    rows = {b["name"]: b for b in d0["bitmaps"]}
    assert (rows[first]["state"], rows[first]["expected"]) == ("frozen", "checkpoint 1")
    assert (rows[second]["state"], rows[second]["expected"]) == (
        "recording",
        "checkpoint 2 (latest)",
    )
    # the open export's change set lives on its snapshot-access node, not on the disk
    assert not [b for b in d0["bitmaps"] if b["name"].startswith("cbt-tmp-")]
    assert rows[first]["dirtyBytes"] == 65536  # the write between the two checkpoints

    await disable(agent, task)
    assert await agent.stop() == 0

    # agent down: through the VM's extra QMP socket; everything still where it belongs
    out = run(agent.config, "checkpoints", vm.vm_uuid, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = as_json(out)
    assert (report["source"], report["agent"]["running"]) == ("qmp-socket", False)
    assert report["disks"][0]["nextEnable"] == {
        "mode": "incremental",
        "since": second,
        "reason": None,
    }

    # behind the agent's back: checkpoint 1 removed from disk 0
    vm.qmp("block-dirty-bitmap-remove", {"node": vm.node_name(v0), "name": first})
    out = run(agent.config, "checkpoints", vm.vm_uuid, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = as_json(out)
    d0, d1 = report["disks"]
    assert flagged(d0) == [(0, first, "absent", ["missing"])]
    assert (d0["consistent"], d1["consistent"], flagged(d1)) == (False, True, [])
    assert set(report["legend"]) == {"missing"}
    text = run(agent.config, "checkpoints", vm.vm_uuid)
    assert text.returncode == 1 and text.stderr == ""
    line = next(x for x in text.stdout.splitlines() if first in x)
    assert line.split()[:3] == ["0", first, "absent"] and "missing" in line.split()
    assert "1 mismatch" in text.stdout and "missing" in text.stdout.splitlines()[-1]

    # shut off: read from the image files, the same verdict
    vm.shutdown()
    report = as_json(run(agent.config, "checkpoints", vm.vm_uuid, "--json"))
    assert (report["source"], report["running"]) == ("qemu-img", False)
    assert flagged(report["disks"][0]) == [(0, first, "absent", ["missing"])]
    assert report["disks"][0]["bitmaps"][0]["dirtyBytes"] is None  # files hold no counts

    # a top made with qemu-img while the VM is off: the latest checkpoint is on the wrong layer
    overlay = tmp_path / "overlay.qcow2"
    chainops.offline_snapshot(vm, v1, overlay)
    out = run(agent.config, "checkpoints", vm.vm_uuid, "--json")
    assert out.returncode == 1
    d1 = as_json(out)["disks"][1]
    assert [layer["image"] for layer in d1["layers"]] == [
        str(overlay),
        str(vm.volumes[1].path),
    ]
    assert flagged(d1) == [(0, second, "absent", ["wrong-layer"])]
    assert d1["nextEnable"]["mode"] == "full" and str(overlay) in d1["nextEnable"]["reason"]


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at teardown is killed by its pid."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def bitmap_names(vm: stack.TestVm, volume_uuid: str) -> set[str]:
    return {b["name"] for b in vm.bitmaps(volume_uuid)}


def file_bitmaps(path: Path) -> set[str]:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    return {b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def plant(off: stack.TestVm, state: Path, off_stray: str) -> tuple[Path, Path, Path]:
    """A bitmap of no known task in a shut-off VM's image; two scratch files no export records
    and a dead NBD socket of that VM in the agent's directories. Returns (scratch, held,
    socket)."""
    off_image = off.volumes[0].path
    subprocess.run(["qemu-img", "bitmap", "--add", str(off_image), off_stray], check=True)
    scratch = state / "scratch" / f"{'c' * 32}-{'d' * 32}.qcow2"
    held = state / "scratch" / "held.qcow2"
    for path in (scratch, held):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    (state / "nbd").mkdir(mode=0o700, exist_ok=True)
    sock = state / "nbd" / f"{off.vm_uuid}.sock"
    os.mknod(sock, stat.S_IFSOCK | 0o600)
    return scratch, held, sock


def start_daemon(held: Path) -> subprocess.Popen[bytes]:
    """A qemu-storage-daemon holding `held` open, as a leftover offline export would."""
    return subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=held,filename={held}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_sweep_lists_strays_and_removes_them_only_with_apply(
    vm_factory: Callable[..., stack.TestVm],
    agent_process: Callable[..., AgentProcess],
    started: list[subprocess.Popen[bytes]],
) -> None:
    vm = vm_factory(disks_mib=[16])
    off = vm_factory(disks_mib=[16], start=False)
    vol = vm.volumes[0].volume_uuid
    agent = agent_process("12350:12399")
    await agent.start()
    task = await start_task(agent, vm.vm_uuid)
    known = (await enable(agent, task))[0]["bitmapName"]
    await disable(agent, task)

    # planted: bitmaps of tasks nobody knows (running VM, shut-off VM's file), a scratch file no
    # export records, a dead NBD socket, a qemu-storage-daemon holding a scratch file
    stray = "cbt-aaaaaaaaaaaa-000001"
    vm.qmp(
        "block-dirty-bitmap-add",
        {"node": vm.node_name(vol), "name": stray, "persistent": True},
    )
    off_stray = "cbt-tmp-bbbbbbbbbbbb-000003"
    state = agent.config.parent / "state"
    scratch, held, sock = plant(off, state, off_stray)
    daemon = start_daemon(held)
    started.append(daemon)
    for _ in range(100):  # the daemon has opened the file
        with contextlib.suppress(OSError):
            if any(
                os.readlink(f"/proc/{daemon.pid}/fd/{fd}") == str(held)
                for fd in os.listdir(f"/proc/{daemon.pid}/fd")
            ):
                break
        await asyncio.sleep(0.05)
    # only the test's own VMs: the host is shared with other sessions' VMs
    only = ["--vm", vm.vm_uuid, "--vm", off.vm_uuid]

    def planted_still_there() -> bool:
        return (
            stray in bitmap_names(vm, vol)
            and off_stray in file_bitmaps(off.volumes[0].path)
            and scratch.exists()
            and held.exists()
            and sock.exists()
            and daemon.poll() is None
        )

    # listing, with the agent running: everything found, nothing touched
    out = run(agent.config, "sweep", *only, "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    listed = as_json(out)
    assert listed["applied"] is False and listed["agent"]["running"] is True
    got = {(s["kind"], s["name"], s["action"]) for s in listed["strays"]}
    assert got == {
        ("bitmap", stray, "would remove"),
        ("bitmap", off_stray, "would remove"),
        ("scratch", str(scratch), "would remove"),
        ("scratch", str(held), "keep"),
        ("nbd-socket", str(sock), "would remove"),
        ("storage-daemon", f"pid {daemon.pid}", "would remove"),
    }
    kept = next(s for s in listed["strays"] if s["name"] == str(held))
    assert f"pid {daemon.pid} (qemu-storage-daemon)" in kept["keep"]
    assert planted_still_there()

    # --apply while the agent runs: refused, in one line, nothing touched
    out = run(agent.config, "sweep", *only, "--apply")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "refused: the agent is running" in out.stderr
    assert planted_still_there()

    # agent stopped: --apply removes every stray, the daemon first (it held a scratch file)
    assert await agent.stop() == 0
    text = run(agent.config, "sweep", *only)
    assert text.returncode == 1 and "would remove" in text.stdout
    assert text.stdout.splitlines()[1].split() == ["KIND", "ACTION", "WHAT", "WHERE", "WHY"]
    assert planted_still_there()
    out = run(agent.config, "sweep", *only, "--apply", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    applied = as_json(out)
    assert {(s["kind"], s["name"], s["action"]) for s in applied["strays"]} == {
        (kind, name, "removed") for kind, name, _ in got
    }
    assert daemon.wait(10) is not None
    assert bitmap_names(vm, vol) == {known}  # the task's own checkpoint stays
    assert off_stray not in file_bitmaps(off.volumes[0].path)
    assert not scratch.exists() and not held.exists() and not sock.exists()
    again = run(agent.config, "sweep", *only)
    assert again.returncode == 0 and "nothing stray" in again.stdout
