"""libvirt lifecycle events mapped to what the agent acts on (pure). A live migration away
cannot be run on one host, so its mapping is proven here."""

from __future__ import annotations

import libvirt
import pytest

from cbt_agent.hypervisor.libvirt import VmEventKind, lifecycle_event

VM = "ab" * 16


@pytest.mark.parametrize(
    ("event", "detail", "kind"),
    [
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED, "started"),
        (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED, "started"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, "stopped"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, "stopped"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED, "stopped"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, "crashed"),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED, "crashed"),
        (
            libvirt.VIR_DOMAIN_EVENT_STOPPED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
            "migrated-away",
        ),
        (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0, "undefined"),
    ],
)
def test_lifecycle_events_that_matter(event: int, detail: int, kind: str) -> None:
    ev = lifecycle_event(VM, event, detail)
    assert ev is not None
    assert (ev.vm_uuid, ev.kind) == (VM, VmEventKind(kind))
    assert ev.detail == f"libvirt event {event}/{detail}"


@pytest.mark.parametrize(
    "event",
    [
        libvirt.VIR_DOMAIN_EVENT_DEFINED,
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
        libvirt.VIR_DOMAIN_EVENT_RESUMED,
    ],
)
def test_other_events_change_nothing(event: int) -> None:
    assert lifecycle_event(VM, event, 0) is None
