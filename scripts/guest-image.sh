#!/usr/bin/env bash
# Builds (once) a minimal Debian guest for the real-guest tests and the demo: an ext4 root
# filesystem in a qcow2 image with systemd and qemu-guest-agent, and the kernel and initrd to
# boot it with libvirt's direct kernel boot (root=/dev/vda). About 90 s and 400 MB, cached
# outside the repository and rebuilt only when this recipe changes.
#
#   scripts/guest-image.sh            prints the cache directory (building it if needed)
#   CBT_GUEST_CACHE=DIR               where images are kept (default /var/cache/cbt-agent/guest)
#
# The directory holds disk.qcow2, vmlinuz and initrd.img; the image is never modified by the
# tests (they put an overlay on it).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CBT_GUEST_CACHE:-/var/cache/cbt-agent/guest}
RECIPE=$(sha256sum "$0" | cut -c1-16)
OUT=$CACHE/$RECIPE
log() { printf '[guest-image] %s\n' "$*" >&2; }

if [ -f "$OUT/ready" ]; then
  echo "$OUT"
  exit 0
fi

for tool in debootstrap mkfs.ext4; do
  if ! command -v "$tool" >/dev/null; then
    log "installing $tool"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap e2fsprogs >/dev/null
  fi
done

# the mirror apt already uses on this machine
MIRROR=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
if [ -z "$MIRROR" ]; then
  MIRROR=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root

log "debootstrap bookworm from $MIRROR (about a minute)"
debootstrap --variant=minbase \
  --include=linux-image-amd64,qemu-guest-agent,systemd-sysv,udev,e2fsprogs,util-linux,kmod \
  bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }

log "configuring the guest"
echo cbt-guest >"$ROOT/etc/hostname"
printf '/dev/vda / ext4 defaults,discard 0 1\n' >"$ROOT/etc/fstab"
# a small initramfs with just what finds /dev/vda; kernel modules only for what a virtio guest
# uses (the image shrinks from ~580 to ~200 MB, and boots faster)
printf 'virtio_pci\nvirtio_blk\nvirtio_console\next4\n' >>"$ROOT/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=list/' "$ROOT/etc/initramfs-tools/initramfs.conf"
KVER=$(ls "$ROOT/lib/modules")
MODS=$ROOT/lib/modules/$KVER/kernel
find "$MODS" -mindepth 1 -maxdepth 1 ! -name fs ! -name drivers ! -name lib ! -name crypto \
  ! -name arch -exec rm -rf {} +
find "$MODS/drivers" -mindepth 1 -maxdepth 1 ! -name block ! -name virtio ! -name char \
  ! -name acpi ! -name input ! -name md -exec rm -rf {} +
chroot "$ROOT" depmod "$KVER"
chroot "$ROOT" update-initramfs -u -k "$KVER" >/dev/null 2>&1
rm -rf "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/locale/* \
  "$ROOT"/usr/share/info/*
# quiet and quick: no getty on tty1 (no screen), root without password on the serial console
chroot "$ROOT" systemctl mask getty@tty1.service systemd-timesyncd.service apt-daily.timer \
  apt-daily-upgrade.timer e2scrub_reap.service e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
chroot "$ROOT" passwd -d root >/dev/null
# qemu-guest-agent starts when its virtio port appears (udev), as on any Debian guest
mkdir -p "$ROOT/etc/systemd/system/qemu-guest-agent.service.d"
printf '[Unit]\nConditionPathExists=/dev/virtio-ports/org.qemu.guest_agent.0\n' \
  >"$ROOT/etc/systemd/system/qemu-guest-agent.service.d/cbt.conf"
chroot "$ROOT" systemctl enable qemu-guest-agent.service >/dev/null 2>&1 || true
rm -rf "$ROOT/var/cache/apt/archives"/*.deb "$ROOT/var/lib/apt/lists"/*

cp "$ROOT"/boot/vmlinuz-* "$WORK/vmlinuz"
cp "$ROOT"/boot/initrd.img-* "$WORK/initrd.img"
rm -rf "$ROOT/boot"/*

log "making the filesystem image"
truncate -s 1G "$WORK/disk.raw"
mkfs.ext4 -q -F -L cbt-root -d "$ROOT" "$WORK/disk.raw"
qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
rm -f "$WORK/disk.raw"
rm -rf "$ROOT"

mkdir -p "$OUT"
mv "$WORK/disk.qcow2" "$WORK/vmlinuz" "$WORK/initrd.img" "$OUT/"
chmod 0444 "$OUT/disk.qcow2"
touch "$OUT/ready"
# older recipes' images are of no use any more
for old in "$CACHE"/*/; do
  [ "${old%/}" = "$OUT" ] || rm -rf "${old%/}"
done
log "ready: $OUT"
echo "$OUT"
