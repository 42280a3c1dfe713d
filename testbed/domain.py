"""Throwaway ZStack-style libvirt domains for the tests, the benchmarks and the demo."""

from __future__ import annotations

import uuid
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr


def throwaway_domain_xml(
    vm_uuid: str,
    disks: list[tuple[str, Path]],
    qmp_socket: Path | None,
    *,
    memory_mib: int = 64,
    description: str = "cbt-agent throwaway VM",
    kernel: tuple[Path, Path] | None = None,
    console_log: Path | None = None,
    share_rw: bool = False,
) -> str:
    """A ZStack-style TCG domain: name = vm uuid, disk serial = volume uuid, optionally ZStack's
    extra QMP socket through <qemu:commandline>. Without `kernel` it has no OS; with (vmlinuz,
    initrd) it boots Linux from them with the first disk as root, a serial console (to
    `console_log`) and the qemu-guest-agent channel, like a real guest. With `share_rw` each
    disk's device shares write access (QEMU's `share-rw`, through libvirt's <qemu:override>),
    so another writer, e.g. a writable NBD export of the disk's node, can write beside it."""
    parts = []
    # a real guest's trims reach the image (and its dirty bitmaps) as discards
    discard = " discard='unmap'" if kernel is not None else ""
    for i, (volume_uuid, path) in enumerate(disks):
        parts.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'{discard}/>"
            f"<source file={quoteattr(str(path))}/>"
            f"<target dev='vd{chr(ord('a') + i)}' bus='virtio'/>"
            f"<serial>{volume_uuid}</serial></disk>"
        )
    cmdline = ""
    if qmp_socket is not None:
        arg = quoteattr(f"unix:{qmp_socket},server=on,wait=off")
        cmdline = (
            f"<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value={arg}/></qemu:commandline>"
        )
    if share_rw:
        # libvirt names a disk's device virtio-disk<i> (its alias); override takes that name
        cmdline += (
            "<qemu:override>"
            + "".join(
                f"<qemu:device alias='virtio-disk{i}'><qemu:frontend>"
                "<qemu:property name='share-rw' type='bool' value='true'/>"
                "</qemu:frontend></qemu:device>"
                for i in range(len(disks))
            )
            + "</qemu:override>"
        )
    return (
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>{vm_uuid}</name><uuid>{uuid.UUID(hex=vm_uuid)}</uuid>"
        f"<description>{escape(description)}</description>"
        f"<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type>{_kernel_boot(kernel)}</os>"
        "<on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>"
        "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
        f"{''.join(parts)}{_guest_devices(kernel, console_log)}"
        "<controller type='usb' model='none'/><memballoon model='none'/>"
        # a PCIe root port per disk, and two spare: q35 hot-plugs a disk only into a free one
        "<controller type='pci' index='0' model='pcie-root'/>"
        + "<controller type='pci' model='pcie-root-port'/>"
        * (len(disks) + 2)
        + "</devices>"
        f"{cmdline}</domain>"
    )


def _kernel_boot(kernel: tuple[Path, Path] | None) -> str:
    if kernel is None:
        return ""
    vmlinuz, initrd = kernel
    return (
        f"<kernel>{escape(str(vmlinuz))}</kernel><initrd>{escape(str(initrd))}</initrd>"
        "<cmdline>root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0</cmdline>"
    )


def _guest_devices(kernel: tuple[Path, Path] | None, console_log: Path | None) -> str:
    if kernel is None:
        return ""
    console = (
        f"<serial type='file'><source path={quoteattr(str(console_log))}/></serial>"
        if console_log is not None
        else "<serial type='null'/>"
    )
    return (
        f"{console}<controller type='virtio-serial'/>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
