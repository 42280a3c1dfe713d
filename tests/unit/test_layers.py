"""The house's arrows run one way: nothing below the API imports from it (the engine speaks the
domain; ZStack's JSON, ErrorCodes and api-jobs live in cbt_agent/api/)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cbt_agent"
BELOW_THE_API = [
    "reasons.py",
    "dirtymap.py",
    "metrics.py",
    "logctx.py",
    "sdnotify.py",
    "secretfiles.py",
    "units.py",
    "qcow2.py",
    "engine",
    "qemu",
    "hypervisor",
    "store",
    "model.py",
    "errors.py",
    "config.py",
    "commands.py",
    "contract",
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_below_the_api_imports_from_it() -> None:
    offenders: list[str] = []
    for entry in BELOW_THE_API:
        root = PACKAGE / entry
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        assert files, entry
        for path in files:
            bad = sorted(
                m
                for m in imported_modules(path)
                if m == "cbt_agent.api" or m.startswith("cbt_agent.api.")
            )
            if bad:
                offenders.append(f"{path.relative_to(PACKAGE)}: {', '.join(bad)}")
    assert offenders == []


def test_the_check_sees_an_offender(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from cbt_agent.api import zstack\nimport cbt_agent.api.jobs\n")
    assert {"cbt_agent.api", "cbt_agent.api.zstack", "cbt_agent.api.jobs"} <= imported_modules(
        module
    )


def test_the_installed_package_holds_no_development_code() -> None:
    """Guest writes through HMP qemu-io, the demo and fault injection live in testbed/ and
    tests/: nothing in cbt_agent/ imports them or speaks HMP."""
    offenders: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        dev = sorted(
            m for m in imported_modules(path) if m.split(".")[0] in ("testbed", "tests", "stack")
        )
        text = path.read_text()
        if dev or "VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP" in text or "qemu-io" in text:
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_the_contract_is_pure() -> None:
    """cbt_agent/contract depends on pydantic, errors.py and model.py only: the API, the client
    and the tests can all read it."""
    allowed = ("cbt_agent.contract", "cbt_agent.errors", "cbt_agent.model")
    offenders: list[str] = []
    for path in sorted((PACKAGE / "contract").rglob("*.py")):
        for m in imported_modules(path):
            if m.startswith("cbt_agent") and not m.startswith(allowed):
                offenders.append(f"{path.relative_to(PACKAGE)}: {m}")
            if m.split(".")[0] in ("aiohttp", "libvirt", "qemu", "sqlite_utils"):
                offenders.append(f"{path.relative_to(PACKAGE)}: {m}")
    assert offenders == []


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by their base name (no packages under tests/): two files of
    one name in different folders break collection of the whole suite."""
    names = [p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []


def test_the_backup_clients_path_loads_nothing_heavy() -> None:
    """`cbt-agent backup` starts once per backup: what its path imports is paid each time
    (pydantic and the models ~0.2 s, asyncio ~0.05 s, http.client ~0.04 s, the QEMU process
    tools behind libnbd's PSK module ~0.07 s). They stay off it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from cbt_agent import cli\n"
        "from cbt_agent.client import auth, backup, progress, restore, verify\n"
        "from cbt_agent.client import copy\n"  # loaded once there is something to read
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = {"pydantic", "pydantic_core", "asyncio", "http.client", "aiohttp", "qemu.qmp"}
    heavy |= {"cbt_agent.config", "cbt_agent.contract.replies", "cbt_agent.qemu.psk"}
    assert heavy.isdisjoint(out), sorted(heavy.intersection(out))
    assert {"cbt_agent.contract.jsoncheck", "nbd"} <= set(out)
