"""Guest writes without a guest OS: HMP `qemu-io` on a disk's device backend, through libvirt.

Facts relied on (verified on libvirt 9.0 / QEMU 7.2):
- HMP `qemu-io` prints its result (including "write failed: ...") on QEMU's stdout, which is the
  domain log file (`<qemu_log_dir>/<name>.log`), not the HMP reply: `qemu_io` reads the log.
- The node-name form fails with a permission conflict unless the device has `share-rw=on`:
  write through the device (`-d /machine/peripheral/<alias>/virtio-backend`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import libvirt_qemu

from cbt_agent.errors import HypervisorError
from cbt_agent.hypervisor.libvirt import Hypervisor

QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
_ERROR_MARKERS = ("error", "failed", "not found", "unknown command", "invalid")


def _looks_failed(output: str) -> bool:
    low = output.lower()
    return any(m in low for m in _ERROR_MARKERS)


def _hmp_error(output: str) -> bool:
    low = output.lower()
    return any(
        line.strip().startswith(("error", "unknown command")) for line in low.splitlines()
    ) or ("could not" in low)


async def hmp(hv: Hypervisor, vm_uuid: str, command_line: str) -> str:
    """Run one HMP command on the VM through libvirt; returns its output.

    Raises HypervisorError when the output reports an error. Note that `qemu-io` prints its
    own result on QEMU's stdout (the domain log), not here: use `qemu_io` for writes.
    """
    conn = await hv.connection()

    def run() -> str:
        dom = conn.lookupByName(vm_uuid)
        return str(
            libvirt_qemu.qemuMonitorCommand(
                dom, command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        )

    try:
        out = await asyncio.to_thread(run)
    except libvirt.libvirtError as e:
        raise HypervisorError(str(e)) from e
    if out.strip() and (
        _looks_failed(out) if command_line.lstrip().startswith("qemu-io") else _hmp_error(out)
    ):
        raise HypervisorError(f"HMP {command_line!r} failed: {out.strip()}")
    return out


async def qemu_io(
    hv: Hypervisor, vm_uuid: str, qdev: str, command: str, log_dir: Path = QEMU_LOG_DIR
) -> str:
    """Run `qemu-io -d <qdev> "<command>"` and return qemu-io's output.

    qdev is a QOM path such as /machine/peripheral/virtio-disk0/virtio-backend (see
    DiskInfo.qdev). qemu-io writes its result to QEMU's stdout, which libvirt sends to the
    domain log: the output is taken from there, and an error in it raises HypervisorError.
    """
    if '"' in command:
        raise ValueError("qemu-io command must not contain double quotes")
    log = log_dir / f"{vm_uuid}.log"

    def log_size() -> int | None:
        try:
            return log.stat().st_size
        except OSError:
            return None

    def log_tail(offset: int) -> str:
        with log.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    before = await asyncio.to_thread(log_size)
    out = await hmp(hv, vm_uuid, f'qemu-io -d {qdev} "{command}"')
    if before is None:
        return out
    printed = await asyncio.to_thread(log_tail, before)
    if _looks_failed(printed):
        raise HypervisorError(f"qemu-io {command!r} on {qdev} failed: {printed.strip()}")
    return printed
