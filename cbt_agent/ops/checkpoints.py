"""`cbt-agent checkpoints VM_UUID`: per disk, per layer of its chain, the bitmaps QEMU reports
beside what the database expects, every mismatch flagged (the rules are in `audit`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cbt_agent.config import Config
from cbt_agent.errors import NotFound
from cbt_agent.hypervisor.libvirt import Hypervisor
from cbt_agent.ops import table
from cbt_agent.ops.audit import LEGEND, DiskAudit, Flag, Recorded, audit_disk, task_prefix
from cbt_agent.ops.chains import SOURCE_FILES, SOURCE_LIBVIRT, SOURCE_SOCKET, read_vm
from cbt_agent.ops.presence import AgentPresence, agent_presence
from cbt_agent.store import SyncStore

SOURCES = {
    SOURCE_SOCKET: "read through its extra QMP socket",
    SOURCE_LIBVIRT: "read through libvirt's QMP passthrough",
    SOURCE_FILES: "shut off: read from its image files (qemu-img)",
}


def recorded_for(store: SyncStore | None, vm_uuid: str) -> tuple[Recorded, dict[str, str]]:
    """What the database holds for the VM, and the format node of each disk with an open
    export (volume -> node)."""
    if store is None:
        return Recorded(None), {}
    tasks = store.list_tasks()
    by_prefix = {task_prefix(t.uuid): t for t in tasks}
    task = store.task_for_vm(vm_uuid)
    if task is None:
        return Recorded(None, tasks_by_prefix=by_prefix), {}
    exports = store.exports(task.uuid)
    recorded = Recorded(
        task=task,
        checkpoints=tuple(store.checkpoints(task.uuid)),
        removed=frozenset(store.removed_checkpoint_names(task.uuid)),
        temp_bitmaps={e.volume_uuid: e.temp_bitmap for e in exports if e.temp_bitmap},
        tasks_by_prefix=by_prefix,
        pending=store.pending_breaks(task.uuid),
        tracking_lost=store.tracking_lost(task.uuid),
    )
    return recorded, {e.volume_uuid: e.device_node for e in exports}


@dataclass(frozen=True)
class CheckpointReport:
    vm_uuid: str
    running: bool
    source: str
    agent: AgentPresence
    recorded: Recorded
    disks: tuple[DiskAudit, ...]

    @property
    def consistent(self) -> bool:
        return all(d.consistent for d in self.disks)

    @property
    def flags(self) -> list[Flag]:
        return [f for d in self.disks for f in d.flags]


async def inspect_checkpoints(
    config: Config, store: SyncStore | None, vm_uuid: str
) -> CheckpointReport:
    """Read the VM's chains (nothing is changed) and audit them against the database.
    Raises NotFound when libvirt has no such VM."""
    agent = agent_presence(config)
    recorded, export_nodes = recorded_for(store, vm_uuid)
    async with Hypervisor(config.libvirt_uri) as hv:
        vm = await hv.find_vm(vm_uuid)
        if vm is None:
            task = recorded.task
            raise NotFound(
                f"VM {vm_uuid} is not defined on this host"
                + (f" (the database has task {task.uuid}, {task.status})" if task else "")
            )
        chains = await read_vm(
            config, hv, vm, socket_free=not agent.running, export_nodes=export_nodes
        )
    disks = tuple(
        audit_disk(c.disk.volume_uuid, c.disk.target, c.layers, recorded, counted=chains.counted)
        if c.error is None
        else DiskAudit(c.disk.volume_uuid, c.disk.target, (), (), None, None, c.error)
        for c in chains.disks
    )
    return CheckpointReport(vm_uuid, vm.running, chains.source, agent, recorded, disks)


def to_json(report: CheckpointReport) -> dict[str, Any]:
    task = report.recorded.task
    return {
        "vmInstanceUuid": report.vm_uuid,
        "running": report.running,
        "source": report.source,
        "agent": report.agent.to_json(),
        "task": None
        if task is None
        else {
            "uuid": task.uuid,
            "name": task.name,
            "status": task.status.value,
            "reason": task.reason,
        },
        "consistent": report.consistent,
        "disks": [_disk_json(d) for d in report.disks],
        "legend": {f.value: LEGEND[f] for f in Flag if f in report.flags},
    }


def _disk_json(d: DiskAudit) -> dict[str, Any]:
    plan = d.next_enable
    return {
        "volumeUuid": d.volume_uuid,
        "target": d.target,
        "error": d.error,
        "consistent": d.consistent,
        "layers": [
            {
                "layer": i,
                "image": layer.filename,
                "format": layer.driver,
                "node": layer.node or None,
            }
            for i, layer in enumerate(d.layers)
        ],
        "bitmaps": [
            {
                "layer": r.layer,
                "name": r.name,
                "state": r.state,
                "granularity": r.granularity,
                "dirtyBytes": r.count,
                "expected": r.expected,
                "flags": [f.value for f in r.flags],
                "detail": r.detail,
            }
            for r in d.bitmaps
        ],
        "nextEnable": None
        if plan is None
        else {"mode": plan.mode, "since": plan.since, "reason": plan.reason},
        "trackingBreak": d.tracking,
    }


def lines(report: CheckpointReport) -> list[str]:
    """The report for a person: a block per disk, a table of its bitmaps, the flags' legend."""
    task = report.recorded.task
    out = [
        f"VM {report.vm_uuid}  {'running' if report.running else 'shut off'}; "
        f"{SOURCES[report.source].removeprefix('shut off: ')}"
    ]
    if task is None:
        out.append("task: none in the database")
    else:
        reason = f" ({task.reason})" if task.reason else ""
        out.append(f"task {task.uuid}  {task.status.value}{reason}")
    for d in report.disks:
        out.append("")
        out.append(f"disk {d.volume_uuid} ({d.target or '-'})")
        if d.error is not None:
            out.append(f"  cannot read its chain: {d.error}")
            continue
        for i, layer in enumerate(d.layers):
            node = f", {layer.node}" if layer.node else ""
            out.append(f"  layer {i}  {layer.filename} ({layer.driver}{node})")
        if d.bitmaps:
            rows = [
                [
                    "-" if r.layer is None else str(r.layer),
                    r.name,
                    r.state,
                    table.size(r.count),
                    r.expected or "-",
                    ",".join(f.value for f in r.flags) or "-",
                    r.detail or "",
                ]
                for r in d.bitmaps
            ]
            headers = ["LAYER", "BITMAP", "STATE", "DIRTY", "DATABASE", "FLAGS", "DETAIL"]
            out.extend("  " + line for line in table.render(headers, rows, right=(0, 3)))
        else:
            out.append("  no bitmaps")
        plan = d.next_enable
        if plan is not None:
            what = (
                f"incremental since {plan.since}"
                if plan.mode == "incremental"
                else (f"full: {plan.reason}")
            )
            out.append(f"  next Enable: {what}")
        if d.tracking is not None:
            out.append(f"  tracking interrupted: {d.tracking}")
    out.append("")
    flags = report.flags
    unread = [d for d in report.disks if d.error is not None]
    if report.consistent:
        out.append("consistent: every bitmap is where the database expects it")
        return out
    summary = f"{len(flags)} mismatch{'es' if len(flags) != 1 else ''}"
    if unread:
        summary += f", {len(unread)} disk(s) unreadable"
    out.append(summary)
    for f in Flag:
        if f in flags:
            out.append(f"  {f.value:12}  {LEGEND[f]}")
    return out
