"""The price of a quiesced checkpoint on a real guest: Enable with and without the freeze, and
how long the guest's filesystems stay frozen.

A minimal Debian guest (scripts/guest-image.sh) booted under TCG with its qemu-guest-agent;
CbtService built as the app builds it. Cycles alternate: Enable with `quiesce::true`, Disable,
Enable with `quiesce::false`, Disable; a few guest writes (guest-exec) before each, untimed.

- freeze window: what the agent records (freeze to thaw, around the checkpoint transaction);
  LIMIT: the guest agent's own freeze + thaw, called back to back through libvirt with nothing
  between (the floor of any quiesced checkpoint). Allowed: window <= 1.5x that (median).
- Enable time with and without quiesce: printed for information (the difference is the freeze).

Run: .venv/bin/python -m bench.bench_quiesce [--cycles 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from bench.stats import median_ms, row, run_guarded, verdict
from cbt_agent.api import validate
from cbt_agent.config import ApiConfig, Config, NbdConfig
from cbt_agent.engine.service import CbtService
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.qemu.qmp import QmpRouter
from cbt_agent.store import Store, SyncStore
from testbed.domain import throwaway_domain_xml

URI = "qemu:///system"
ALLOWED = 1.5
VM_MARK = "cbt-agent test VM"  # tests/stack.py reaps marked domains of dead processes
ROOT = Path(__file__).resolve().parents[1]
WINDOW = re.compile(r"guest filesystems frozen (\d+) ms")


def guest_agent(dom: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(message), 30, 0))["return"]


def guest_sh(dom: Any, script: str) -> None:
    pid = guest_agent(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})["pid"]
    while not guest_agent(dom, "guest-exec-status", {"pid": pid})["exited"]:
        time.sleep(0.05)


async def run(cycles: int) -> int:
    out = await asyncio.to_thread(
        subprocess.run,
        ["bash", str(ROOT / "scripts" / "guest-image.sh")],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        print(out.stderr)
        return 1
    image = Path(out.stdout.strip().splitlines()[-1])
    work = Path(tempfile.mkdtemp(prefix="cbt-bench-q-"))
    vm_uuid, volume_uuid = uuid.uuid4().hex, uuid.uuid4().hex
    root = work / "root.qcow2"
    backing = ["-b", str(image / "disk.qcow2"), "-F", "qcow2"]
    await asyncio.to_thread(
        subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(root)], check=True
    )
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(URI)
    dom = conn.defineXML(
        throwaway_domain_xml(
            vm_uuid,
            [(volume_uuid, root)],
            work / f"{vm_uuid}.sock",
            memory_mib=512,
            description=f"{VM_MARK} pid={os.getpid()}",
            kernel=(image / "vmlinuz", image / "initrd.img"),
        )
    )
    hv = Hypervisor(URI)
    config = Config(
        api=ApiConfig(tokens=("bench-token-0123456789",)),
        state_dir=work / "state",
        libvirt_uri=URI,
        qmp_socket_template=f"{work}/{{vm_uuid}}.sock",
        nbd=NbdConfig("127.0.0.1", 13300, 13399),
    )
    store = Store(config.db_path)
    router = QmpRouter(config.qmp_socket_template, hv)
    try:
        dom.create()
        began = time.monotonic()
        while True:
            try:
                guest_agent(dom, "guest-ping")
                break
            except libvirt.libvirtError:
                if time.monotonic() - began > 240:
                    print("the guest agent did not answer within 240 s")
                    return 1
                await asyncio.sleep(0.5)
        print(f"  guest agent answered {time.monotonic() - began:.0f} s after start")
        await hv.open()
        await store.open()
        service = CbtService(config, store, hv, router)
        body = {"params": {"name": "bench", "vmInstanceUuid": vm_uuid}}
        task = (await service.create(validate.create_task(body))).task.uuid
        floor: list[float] = []
        windows: list[float] = []
        enable: dict[bool, list[float]] = {True: [], False: []}
        for cycle in range(cycles + 1):
            for quiesce in (True, False) if cycle % 2 else (False, True):
                await asyncio.to_thread(
                    guest_sh, dom, "dd if=/dev/urandom of=/tmp/x bs=64k count=8 status=none"
                )
                tag = f"quiesce::{'true' if quiesce else 'false'}"
                cmd = validate.enable_task(task, {"params": {}, "systemTags": [tag]})
                t0 = time.perf_counter()
                result = await service.enable(cmd)
                took = time.perf_counter() - t0
                assert result[0].quiesced is quiesce
                await service.disable(validate.disable_task(task, {}))
                if cycle == 0:
                    continue  # the first (full) cycle warms up
                enable[quiesce].append(took)
                if quiesce:
                    rows = await store.run(SyncStore.history_rows, task)
                    reason = next(
                        r["reason"] for r in reversed(rows) if r["to_status"] == "Running"
                    )
                    m = WINDOW.search(reason)
                    assert m is not None, reason
                    windows.append(int(m.group(1)) / 1000)
            t0 = time.perf_counter()
            await asyncio.to_thread(dom.fsFreeze)
            await asyncio.to_thread(dom.fsThaw)
            floor.append(time.perf_counter() - t0)
        print(row("LIMIT guest agent freeze + thaw", floor))
        print(row("freeze window recorded by the agent", windows))
        print(row("Enable, quiesced", enable[True]))
        print(row("Enable, crash-consistent", enable[False]))
        print(
            f"  quiesce adds {median_ms(enable[True]) - median_ms(enable[False]):.1f} ms "
            "to an Enable (median)"
        )
        return 0 if verdict("freeze window / guest freeze+thaw", windows, floor, ALLOWED) else 1
    finally:
        await router.close()
        await hv.close()
        await store.close()
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
        conn.close()
        await asyncio.to_thread(shutil.rmtree, work, True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cycles", type=int, default=10)
    args = p.parse_args()
    run_guarded("bench_quiesce", lambda: run(args.cycles))


if __name__ == "__main__":
    main()
