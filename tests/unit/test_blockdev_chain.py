"""Reading a disk's backing chain from `query-named-block-nodes` (flat: false), as QEMU 7.2
answers it after a libvirt snapshot while an export runs: pure, on recorded shapes."""

from __future__ import annotations

from typing import Any

from cbt_agent.qemu.blockdev import disk_chain, file_child

SIZE = 16 << 20


def image(*layers: tuple[str, str]) -> dict[str, Any]:
    """An `image` member: the first (filename, format), its backing-image below it, ..."""
    out: dict[str, Any] = {}
    for filename, fmt in reversed(layers):
        inner = out
        out = {"filename": filename, "format": fmt, "virtual-size": SIZE}
        if inner:
            out["backing-image"] = inner
    return out


def node(name: str, drv: str, filename: str, img: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"node-name": name, "drv": drv, "file": filename, "image": img, "ro": False, **extra}


OV, BASE, SCRATCH = "/vm/ov.qcow2", "/vm/base.qcow2", "/state/scratch.qcow2"
NODES = [
    node("cbtsc-x", "qcow2", SCRATCH, image((SCRATCH, "qcow2"), (OV, "qcow2"), (BASE, "qcow2"))),
    node("cbtsc-x-file", "file", SCRATCH, image((SCRATCH, "file"))),
    node(
        "cbw",
        "copy-before-write",
        OV,
        image((OV, "copy-before-write"), (OV, "qcow2"), (BASE, "qcow2")),
    ),
    node(
        "libvirt-3-format",
        "qcow2",
        OV,
        image((OV, "qcow2"), (BASE, "qcow2")),
        **{"dirty-bitmaps": [{"name": "cbt-a-000002", "recording": True, "granularity": 65536}]},
    ),
    node("libvirt-3-storage", "file", OV, image((OV, "file"))),
    node(
        "libvirt-2-format",
        "qcow2",
        BASE,
        image((BASE, "qcow2")),
        ro=True,
        **{"dirty-bitmaps": [{"name": "cbt-a-000001", "count": 65536}, {"recording": True}]},
    ),
    node("libvirt-2-storage", "file", BASE, image((BASE, "file"))),
]


def test_chain_follows_backing_images_to_their_format_nodes() -> None:
    chain = disk_chain(NODES, "libvirt-3-format")
    assert [(layer.node, layer.filename, layer.read_only) for layer in chain] == [
        ("libvirt-3-format", OV, False),
        ("libvirt-2-format", BASE, True),
    ]
    assert list(chain[0].bitmaps) == ["cbt-a-000002"]
    assert list(chain[1].bitmaps) == ["cbt-a-000001"]  # the anonymous one is left out
    assert chain[1].size == SIZE and chain[1].driver == "qcow2"


def test_chain_from_a_filter_reaches_the_same_layers() -> None:
    assert [layer.node for layer in disk_chain(NODES, "cbw")] == [
        "cbw",
        "libvirt-3-format",
        "libvirt-2-format",
    ]


def test_unknown_top_and_unmatched_backing_end_the_chain() -> None:
    assert disk_chain(NODES, "nope") == []
    orphan = [node("top", "qcow2", "/x.qcow2", image(("/x.qcow2", "qcow2"), ("/gone", "qcow2")))]
    assert [layer.node for layer in disk_chain(orphan, "top")] == ["top"]


def test_file_child_is_the_protocol_node_of_the_same_file() -> None:
    base = disk_chain(NODES, "libvirt-3-format")[1]
    assert file_child(NODES, base) == "libvirt-2-storage"
