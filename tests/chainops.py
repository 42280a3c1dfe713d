"""The image-chain operations ZStack performs on a VM's disks, done the way ZStack does them:
through libvirt (`virsh -c LIBVIRT_URI`), on a `stack.TestVm`. Synchronous; every `virsh` call
has a timeout and a failure raises RuntimeError carrying virsh's stderr.

Verified on these TCG domains (libvirt 9.0, QEMU 7.2), 16 MiB disks:
- `snapshot`: `snapshot-create-as --disk-only --atomic --no-metadata` with one `--diskspec` per
  disk (`snapshot=external,file=...` or `snapshot=no`), ~0.1 s. The overlay must not exist
  (no `--reuse-external` here). libvirt adds an EMPTY same-named copy of every recording
  persistent bitmap to the new top; disabled (frozen) bitmaps are not copied; the old bitmaps
  stay on the node that is now the backing file.
- `commit_inactive`: `blockcommit --top vdX[i] --base vdX[j] --wait` where i and j are the
  `index` attributes of the live XML's `<backingStore>` elements (libvirt's node numbers, e.g.
  `vda[3]`, not positions in the chain: `vda[1]` is refused with "could not find backing store
  index"). ~0.5 s. The committed layer's file stays on disk, out of the chain.
- `commit_active` (`--active --pivot --wait`), `copy` (`blockcopy ... --transient-job --pivot
  --wait`): ~0.5 s each; `stream` (`blockpull --wait`): ~0.05 s. libvirt merges the bitmaps of
  the layers it folds into the surviving node; bitmaps that exist only on a dropped layer
  (e.g. a frozen one on the old base after a stream) are gone.
- libvirt rewrites the persistent (inactive) definition too after each of them, so a VM shut
  off and started again boots the new chain.
- `offline_snapshot`: with the VM shut off, `qemu-img create -b TOP` plus a redefined domain;
  libvirt probes the backing chain itself at the next start. The new top holds no bitmap.
Files made here (overlays, copies) are NOT removed by `TestVm.destroy()`: the caller keeps
them in its own directory and removes that after the VM is gone.
"""

from __future__ import annotations

import json
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import stack

VIRSH_TIMEOUT = 120.0
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

# Keep the `qemu:` prefix of <qemu:commandline> when a domain XML is written back.
ET.register_namespace("qemu", QEMU_NS)


def _run(cmd: list[str], timeout: float) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{' '.join(cmd)}: no answer within {timeout:.0f} s") from e
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}"
        )
    return r.stdout


def virsh(*args: str, timeout: float = VIRSH_TIMEOUT) -> str:
    """`virsh -c LIBVIRT_URI ARGS`; returns stdout, RuntimeError with stderr on failure."""
    return _run(["virsh", "-c", stack.LIBVIRT_URI, *args], timeout)


def _xml(vm: stack.TestVm, inactive: bool) -> ET.Element:
    import libvirt

    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return ET.fromstring(vm.domain().XMLDesc(flags))


def _disk(root: ET.Element, volume_uuid: str) -> ET.Element:
    for disk in root.iterfind("devices/disk"):
        if (disk.findtext("serial") or "").strip() == volume_uuid:
            return disk
    raise KeyError(f"no disk with serial {volume_uuid}")


def targets(vm: stack.TestVm) -> dict[str, str]:
    """serial (volume uuid) -> target dev (vda, vdb, ...), from the domain's XML."""
    root = _xml(vm, inactive=not vm.is_running())
    out: dict[str, str] = {}
    for disk in root.iterfind("devices/disk"):
        serial = (disk.findtext("serial") or "").strip()
        target = disk.find("target")
        if serial and target is not None and target.get("dev"):
            out[serial] = str(target.get("dev"))
    return out


def target_dev(vm: stack.TestVm, volume_uuid: str) -> str:
    try:
        return targets(vm)[volume_uuid]
    except KeyError:
        raise KeyError(f"volume {volume_uuid} is not a disk of VM {vm.vm_uuid}") from None


def _live_chain(vm: stack.TestVm, volume_uuid: str) -> list[tuple[Path, str | None]]:
    """(file, libvirt backing-store index) of each layer, top first (running domain)."""
    node: ET.Element | None = _disk(_xml(vm, inactive=False), volume_uuid)
    chain: list[tuple[Path, str | None]] = []
    first = True
    while node is not None:
        source = node.find("source")
        if source is None or not source.get("file"):
            break
        # the top's index is on <source>, a backing layer's on its <backingStore>
        index = source.get("index") if first else node.get("index")
        chain.append((Path(str(source.get("file"))), index))
        node = node.find("backingStore")
        first = False
    return chain


def _image_chain(top: Path) -> list[Path]:
    """The backing chain of an image file as qemu-img sees it, top first."""
    out = _run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)], VIRSH_TIMEOUT
    )
    return [Path(str(layer["filename"])) for layer in json.loads(out)]


def chain_files(vm: stack.TestVm, volume_uuid: str) -> list[Path]:
    """The disk's current chain, top first: from the live XML of a running domain; for a shut
    off one the inactive XML names only the top (libvirt probes the rest at start), so the
    rest is read from the files."""
    if vm.is_running():
        return [path for path, _ in _live_chain(vm, volume_uuid)]
    source = _disk(_xml(vm, inactive=True), volume_uuid).find("source")
    if source is None or not source.get("file"):
        raise RuntimeError(f"disk {volume_uuid} of VM {vm.vm_uuid} has no source file")
    return _image_chain(Path(str(source.get("file"))))


def _need_running(vm: stack.TestVm, what: str) -> None:
    if not vm.is_running():
        raise RuntimeError(f"{what}: VM {vm.vm_uuid} is not running")


def snapshot(
    vm: stack.TestVm, volume_uuids_to_snapshot: list[str], overlay_dir: Path
) -> dict[str, Path]:
    """Live external disk-only snapshot of the chosen disks (the others `snapshot=no`), in one
    atomic libvirt call, as ZStack takes volume snapshots. Returns volume uuid -> new overlay."""
    _need_running(vm, "snapshot")
    if not volume_uuids_to_snapshot:
        raise ValueError("no disk to snapshot")
    devs = targets(vm)
    unknown = set(volume_uuids_to_snapshot) - set(devs)
    if unknown:
        raise KeyError(f"not disks of VM {vm.vm_uuid}: {sorted(unknown)}")
    overlay_dir.mkdir(parents=True, exist_ok=True)
    overlays: dict[str, Path] = {}
    specs: list[str] = []
    for serial, dev in devs.items():
        if serial in volume_uuids_to_snapshot:
            overlay = overlay_dir / f"{serial[:8]}-snap-{uuid.uuid4().hex[:8]}.qcow2"
            overlays[serial] = overlay
            specs += ["--diskspec", f"{dev},snapshot=external,file={overlay}"]
        else:
            specs += ["--diskspec", f"{dev},snapshot=no"]
    name = f"snap-{uuid.uuid4().hex[:12]}"
    virsh(
        "snapshot-create-as",
        vm.vm_uuid,
        name,
        "--disk-only",
        "--atomic",
        "--no-metadata",
        *specs,
    )
    return overlays


def commit_active(vm: stack.TestVm, volume_uuid: str) -> None:
    """Merge the top layer into its backing file and pivot to it (`blockcommit --active`)."""
    _need_running(vm, "commit_active")
    if len(chain_files(vm, volume_uuid)) < 2:
        raise RuntimeError(f"commit_active: disk {volume_uuid} has no backing file")
    virsh("blockcommit", vm.vm_uuid, target_dev(vm, volume_uuid), "--active", "--pivot", "--wait")


def commit_inactive(vm: stack.TestVm, volume_uuid: str) -> None:
    """Merge the layer just below the top into its own backing file (chain of >= 3 layers):
    top -> mid -> base becomes top -> base."""
    _need_running(vm, "commit_inactive")
    chain = _live_chain(vm, volume_uuid)
    if len(chain) < 3:
        raise RuntimeError(f"commit_inactive: disk {volume_uuid} has {len(chain)} layer(s), not 3")
    dev = target_dev(vm, volume_uuid)
    (_mid, mid_index), (_base, base_index) = chain[1], chain[2]
    if mid_index is None or base_index is None:
        raise RuntimeError(f"commit_inactive: no backing-store index in the live XML: {chain}")
    top, base = f"{dev}[{mid_index}]", f"{dev}[{base_index}]"
    virsh("blockcommit", vm.vm_uuid, dev, "--top", top, "--base", base, "--wait")


def stream(vm: stack.TestVm, volume_uuid: str) -> None:
    """Pull the whole backing chain into the top (`blockpull`): the top then stands alone."""
    _need_running(vm, "stream")
    if len(chain_files(vm, volume_uuid)) < 2:
        raise RuntimeError(f"stream: disk {volume_uuid} has no backing file")
    virsh("blockpull", vm.vm_uuid, target_dev(vm, volume_uuid), "--wait")


def copy(vm: stack.TestVm, volume_uuid: str, dest: Path) -> None:
    """Full copy of the disk's chain, flattened, into `dest` (must not exist), then pivot the
    disk to it (`blockcopy`), as a storage migration does."""
    _need_running(vm, "copy")
    if dest.exists():
        raise RuntimeError(f"copy: {dest} exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dev = target_dev(vm, volume_uuid)
    flags = ("--format", "qcow2", "--transient-job", "--pivot", "--wait")
    virsh("blockcopy", vm.vm_uuid, dev, str(dest), *flags)


def offline_snapshot(vm: stack.TestVm, volume_uuid: str, overlay: Path) -> None:
    """With the VM shut off: `qemu-img create -b TOP` and redefine the domain with the overlay
    as the disk's source (libvirt probes the backing chain at the next start)."""
    import libvirt

    if vm.is_running():
        raise RuntimeError(f"offline_snapshot: VM {vm.vm_uuid} is running")
    if overlay.exists():
        raise RuntimeError(f"offline_snapshot: {overlay} exists")
    root = _xml(vm, inactive=True)
    disk = _disk(root, volume_uuid)
    source = disk.find("source")
    if source is None or not source.get("file"):
        raise RuntimeError(f"disk {volume_uuid} of VM {vm.vm_uuid} has no source file")
    top = str(source.get("file"))
    overlay.parent.mkdir(parents=True, exist_ok=True)
    _run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", str(overlay)],
        VIRSH_TIMEOUT,
    )
    source.set("file", str(overlay))
    for stale in disk.findall("backingStore"):  # the old top's chain: libvirt re-probes it
        disk.remove(stale)
    try:
        stack.connection().defineXML(ET.tostring(root, encoding="unicode"))
    except libvirt.libvirtError as e:
        overlay.unlink(missing_ok=True)
        raise RuntimeError(f"redefining VM {vm.vm_uuid} with {overlay}: {e}") from e
