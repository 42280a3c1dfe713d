#!/usr/bin/env bash
# start|stop|status the host's libvirtd without systemd, tracked by its pidfile.
set -euo pipefail
PIDFILE=${CBT_LIBVIRTD_PIDFILE:-/run/cbt-agent-libvirtd.pid}
running() { [ -s "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
case "${1:-status}" in
  start)
    if ! running; then
      # a libvirtd already running (started by systemd or by hand) serves as well
      if virsh -c qemu:///system version >/dev/null 2>&1; then exit 0; fi
      mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
      libvirtd -d -p "$PIDFILE"
    fi
    for _ in $(seq 1 120); do
      virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
      sleep 0.5
    done
    echo "libvirtd did not answer on qemu:///system" >&2; exit 1 ;;
  stop)
    if running; then pid=$(cat "$PIDFILE"); kill "$pid"; for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done; fi
    rm -f "$PIDFILE" ;;
  status) running && echo "running (pid $(cat "$PIDFILE"))" || { echo "not running"; exit 1; } ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
