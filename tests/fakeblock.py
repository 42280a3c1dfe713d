"""A small model of QEMU's block layer for the fake QMP endpoint: the disks' format nodes and
their bitmaps, scratch nodes, copy-before-write filters and snapshot-access nodes (a device's
`drive` moved with qom-set), the VM's run state, the NBD server and its exports, answering the
commands the agent sends with what QEMU 7.2 answers (the facts of DESIGN.md), not a full QEMU.

A transaction runs on a copy of the state and is committed only when every action succeeded.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from fakeqmp import FakeQmp, QmpError

G = 65536


@dataclass
class Bitmap:
    name: str
    recording: bool = True
    persistent: bool = True
    granularity: int = G
    busy: bool = False
    inconsistent: bool = False
    count: int = 0

    def entry(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "recording": self.recording,
            "persistent": self.persistent,
            "busy": self.busy,
            "granularity": self.granularity,
            "count": self.count,
        }
        if self.inconsistent:  # QEMU shows it only when true
            out["inconsistent"] = True
        return out


@dataclass
class Node:
    name: str
    filename: str
    size: int
    driver: str = "qcow2"
    read_only: bool = False
    backing: str | None = None  # node name
    bitmaps: dict[str, Bitmap] = field(default_factory=dict)
    child: str | None = None  # a filter's or snapshot-access node's `file` (a node name)
    target: str | None = None  # a copy-before-write filter's target


@dataclass
class State:
    nodes: dict[str, Node] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)  # device alias -> top format node
    jobs: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (device, target)
    exports: dict[str, dict[str, Any]] = field(default_factory=dict)
    nbd: dict[str, Any] | None = None  # the running NBD server's address
    capabilities: set[str] = field(default_factory=set)
    running: bool = True
    pauses: int = 0  # stop commands seen
    fdsets: dict[int, str] = field(default_factory=dict)  # fd set id -> its descriptor's opaque
    named_fds: set[str] = field(default_factory=set)  # getfd names the monitor holds


class FakeBlockLayer:
    def __init__(self) -> None:
        self.state = State()

    def add_disk(self, alias: str, node: str, filename: str, size: int) -> Node:
        n = Node(node, filename, size)
        self.state.nodes[node] = n
        self.state.devices[alias] = node
        return n

    def bitmaps(self, node: str) -> dict[str, Bitmap]:
        return self.state.nodes[node].bitmaps

    def install(self, fake: FakeQmp) -> None:
        for command, handler in {
            "query-block": self.query_block,
            "query-named-block-nodes": self.query_named_block_nodes,
            "query-block-jobs": self.query_block_jobs,
            "query-jobs": self.query_jobs,
            "query-block-exports": self.query_block_exports,
            "blockdev-add": self.blockdev_add,
            "blockdev-del": self.blockdev_del,
            "transaction": self.transaction,
            "block-dirty-bitmap-add": lambda a: self._bitmap_add(self.state, a),
            "block-dirty-bitmap-remove": self.bitmap_remove,
            "block-dirty-bitmap-merge": self.bitmap_merge,
            "block-dirty-bitmap-enable": self.bitmap_enable,
            "migrate-set-capabilities": self.migrate_set_capabilities,
            "nbd-server-start": self.nbd_server_start,
            "nbd-server-stop": self.nbd_server_stop,
            "block-export-add": self.block_export_add,
            "block-export-del": self.block_export_del,
            "block-job-cancel": self.block_job_cancel,
            "job-dismiss": lambda a: {},
            "object-del": lambda a: {},
            "qom-set": self.qom_set,
            "query-status": lambda a: {
                "running": self.state.running,
                "status": "running" if self.state.running else "paused",
            },
            "stop": self.stop,
            "cont": self.cont,
            "add-fd": self.add_fd,
            "query-fdsets": self.query_fdsets,
            "remove-fd": self.remove_fd,
            "getfd": self.getfd,
            "closefd": self.closefd,
        }.items():
            fake.on(command, handler)

    # -- queries -----------------------------------------------------------------------------

    def query_block(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for alias, name in self.state.devices.items():
            node = self.state.nodes[name]
            inserted = {
                "node-name": name,
                "drv": node.driver,
                "file": node.filename,
                "image": {"virtual-size": node.size, "filename": node.filename},
            }
            qdev = f"/machine/peripheral/{alias}/virtio-backend"
            out.append({"device": "", "qdev": qdev, "inserted": inserted})
        return out

    def _image(self, node: Node) -> dict[str, Any]:
        image: dict[str, Any] = {
            "filename": node.filename,
            "format": node.driver,
            "virtual-size": node.size,
        }
        below = node.backing or node.child  # QEMU shows a filter's child as its backing image
        if below is not None:
            image["backing-image"] = self._image(self.state.nodes[below])
        return image

    def query_named_block_nodes(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for node in self.state.nodes.values():
            entry: dict[str, Any] = {
                "node-name": node.name,
                "drv": node.driver,
                "file": node.filename,
                "ro": node.read_only,
                "image": self._image(node),
            }
            if node.bitmaps:  # absent when a node has none
                entry["dirty-bitmaps"] = [b.entry() for b in node.bitmaps.values()]
            out.append(entry)
            if node.child is not None:
                continue  # a filter or snapshot-access node has no protocol node of its own
            # its protocol node: same filename, driver file
            out.append(
                {
                    "node-name": f"{node.name}-file",
                    "drv": "file",
                    "file": node.filename,
                    "ro": False,
                }
            )
        return out

    def query_block_jobs(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"device": j, "type": "backup"} for j in self.state.jobs]

    def query_jobs(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": j, "type": "backup", "status": "running"} for j in self.state.jobs]

    def query_block_exports(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"id": x, "type": "nbd", "node-name": e["node-name"], "shutting-down": False}
            for x, e in self.state.exports.items()
        ]

    # -- nodes and jobs ----------------------------------------------------------------------

    def blockdev_add(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["node-name"]
        if name in self.state.nodes:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        driver = args.get("driver", "qcow2")
        if driver in ("copy-before-write", "snapshot-access"):
            child = args["file"]
            for ref in (child, args.get("target")):
                if ref is not None and ref not in self.state.nodes:
                    raise QmpError(f"Cannot find device='' nor node-name='{ref}'")
            below = self.state.nodes[child]
            self.state.nodes[name] = Node(
                name,
                below.filename,
                below.size,
                driver=driver,
                child=child,
                target=args.get("target"),
            )
            return {}
        backing = args.get("backing")
        size = self.state.nodes[backing].size if backing in self.state.nodes else 0
        filename = str(args["file"]["filename"])
        if filename.startswith("/dev/fdset/") and int(filename.rsplit("/", 1)[1]) not in (
            self.state.fdsets
        ):
            raise QmpError(f"Could not open '{filename}': No such file or directory")
        self.state.nodes[name] = Node(name, filename, size, backing=backing)
        return {}

    def blockdev_del(self, args: dict[str, Any]) -> dict[str, Any]:
        name = args["node-name"]
        if name not in self.state.nodes:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        busy = (
            [j for j, (_, t) in self.state.jobs.items() if t == name]
            + [x for x, e in self.state.exports.items() if e["node-name"] == name]
            + [n.name for n in self.state.nodes.values() if name in (n.child, n.target)]
            + [alias for alias, node in self.state.devices.items() if node == name]
        )
        if busy:
            raise QmpError(f"Node '{name}' is busy: in use by {busy[0]}")
        del self.state.nodes[name]
        return {}

    def qom_set(self, args: dict[str, Any]) -> dict[str, Any]:
        path, value = str(args["path"]), str(args["value"])
        alias = path.split("/")[3] if path.startswith("/machine/peripheral/") else ""
        if alias not in self.state.devices:
            raise QmpError(f"Device '{path}' not found", "DeviceNotFound")
        if args["property"] != "drive":
            raise QmpError(f"Property '{args['property']}' not found")
        if value not in self.state.nodes:
            raise QmpError(f"Cannot find device='' nor node-name='{value}'")
        self.state.devices[alias] = value
        return {}

    def stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.state.running = False
        self.state.pauses += 1
        return {}

    def cont(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.state.running = True
        return {}

    def block_job_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.state.jobs.pop(args["device"], None) is None:
            raise QmpError(f"Block job '{args['device']}' not found", "DeviceNotActive")
        return {}

    # -- bitmaps and the transaction ---------------------------------------------------------

    @staticmethod
    def _bitmap(state: State, node: str, name: str) -> Bitmap:
        n = state.nodes.get(node)
        if n is None:
            raise QmpError(f"Cannot find device='' nor node-name='{node}'", "DeviceNotFound")
        b = n.bitmaps.get(name)
        if b is None:
            raise QmpError(f"Dirty bitmap '{name}' not found")
        return b

    @staticmethod
    def _bitmap_add(state: State, args: dict[str, Any]) -> dict[str, Any]:
        node = state.nodes.get(args["node"])
        if node is None:
            raise QmpError(f"Cannot find device='' nor node-name='{args['node']}'")
        if args["name"] in node.bitmaps:
            raise QmpError(f"Bitmap already exists: {args['name']}")
        node.bitmaps[args["name"]] = Bitmap(
            args["name"],
            recording=not args.get("disabled", False),
            persistent=bool(args.get("persistent", False)),
            granularity=int(args.get("granularity", G)),
        )
        return {}

    def bitmap_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        b = self._bitmap(self.state, args["node"], args["name"])
        if b.busy:
            raise QmpError(f"Bitmap '{b.name}' is currently in use by another operation")
        del self.state.nodes[args["node"]].bitmaps[b.name]
        return {}

    def bitmap_merge(self, args: dict[str, Any]) -> dict[str, Any]:
        target = self._bitmap(self.state, args["node"], args["target"])
        for src in args["bitmaps"]:
            node, name = (
                (src["node"], src["name"]) if isinstance(src, dict) else (args["node"], src)
            )
            target.count += self._bitmap(self.state, node, name).count
        return {}

    def bitmap_enable(self, args: dict[str, Any]) -> dict[str, Any]:
        self._bitmap(self.state, args["node"], args["name"]).recording = True
        return {}

    def transaction(self, args: dict[str, Any]) -> dict[str, Any]:
        state = copy.deepcopy(self.state)
        for action in args["actions"]:
            kind, data = action["type"], action["data"]
            if kind == "blockdev-backup":
                if data["job-id"] in state.jobs:
                    raise QmpError(f"Job ID '{data['job-id']}' already in use")
                for key in ("device", "target"):
                    if data[key] not in state.nodes:
                        raise QmpError(f"Cannot find device='' nor node-name='{data[key]}'")
                state.jobs[data["job-id"]] = (data["device"], data["target"])
            elif kind == "block-dirty-bitmap-disable":
                b = self._bitmap(state, data["node"], data["name"])
                if b.busy or b.inconsistent:
                    raise QmpError(f"Bitmap '{b.name}' cannot be disabled")
                b.recording = False
            elif kind == "block-dirty-bitmap-add":
                self._bitmap_add(state, data)
            else:
                raise QmpError(f"unexpected action {kind}")
        self.state = state
        return {}

    def migrate_set_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        for cap in args["capabilities"]:
            if cap["state"]:
                self.state.capabilities.add(cap["capability"])
        return {}

    # -- file descriptors (the fake receives none: only their bookkeeping) --------------------

    def add_fd(self, args: dict[str, Any]) -> dict[str, Any]:
        set_id = max(self.state.fdsets, default=-1) + 1
        self.state.fdsets[set_id] = str(args.get("opaque", ""))
        return {"fdset-id": set_id, "fd": 100 + set_id}

    def query_fdsets(self, _args: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"fdset-id": i, "fds": [{"fd": 100 + i, "opaque": o}]}
            for i, o in sorted(self.state.fdsets.items())
        ]

    def remove_fd(self, args: dict[str, Any]) -> dict[str, Any]:
        set_id = int(args["fdset-id"])
        if set_id not in self.state.fdsets:
            raise QmpError(f"File descriptor named 'fdset-id:{set_id}' not found")
        del self.state.fdsets[set_id]
        return {}

    def getfd(self, args: dict[str, Any]) -> dict[str, Any]:
        self.state.named_fds.add(str(args["fdname"]))
        return {}

    def closefd(self, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args["fdname"])
        if name not in self.state.named_fds:
            raise QmpError(f"File descriptor named '{name}' not found")
        self.state.named_fds.discard(name)
        return {}

    # -- NBD ---------------------------------------------------------------------------------

    def nbd_server_start(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.state.nbd is not None:
            raise QmpError("NBD server already running")
        addr = args["addr"]
        if addr["type"] == "fd":  # the server takes the named descriptor
            name = addr["data"]["str"]
            if name not in self.state.named_fds:
                raise QmpError(f"File descriptor named '{name}' has not been found")
            self.state.named_fds.discard(name)
        self.state.nbd = addr
        return {}

    def nbd_server_stop(self, _args: dict[str, Any]) -> dict[str, Any]:
        if self.state.nbd is None:
            raise QmpError("NBD server not running")
        self.state.nbd = None
        for x in list(self.state.exports):  # stopping the server closes every export
            self._drop_export(x)
        return {}

    def block_export_add(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.state.nbd is None:
            raise QmpError("NBD server not running")
        if args["id"] in self.state.exports:
            raise QmpError(f"Block export id '{args['id']}' is already in use")
        if args["node-name"] not in self.state.nodes:
            raise QmpError(f"Cannot find device='' nor node-name='{args['node-name']}'")
        for b in args.get("bitmaps", []):
            bitmap = self._bitmap(self.state, b["node"], b["name"])
            # stricter than QEMU, whose {node, name} form silently exports a recording bitmap
            # (a change set that keeps changing): the agent must never ask for that
            if bitmap.recording:
                raise QmpError(f"Enabled bitmap '{bitmap.name}' incompatible with readonly export")
            bitmap.busy = True
        self.state.exports[args["id"]] = args
        return {}

    def block_export_del(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["id"] not in self.state.exports:
            raise QmpError(f"Export '{args['id']}' is not found")
        self._drop_export(args["id"])
        return {}

    def _drop_export(self, export_id: str) -> None:
        export = self.state.exports.pop(export_id)
        for b in export.get("bitmaps", []):
            node = self.state.nodes.get(b["node"])
            if node is not None and b["name"] in node.bitmaps:
                node.bitmaps[b["name"]].busy = False
