"""The README's "Reading the status" stays true: every operator command line it shows is run
against a real VM (the agent down, a checkpoint removed behind its back, a stray bitmap
planted), the table headers of its example outputs are the commands' own, and the `--json` keys
it documents are exactly those the commands print."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import stack
from agentproc import AgentProcess

pytestmark = pytest.mark.stack

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Reading the status"
DYNAMIC = {"legend"}  # objects keyed by data (flag names), documented as a whole
# the exit codes the README gives for this scenario (a mismatch planted, a stray planted)
EXIT = {"status": 0, "tasks": 0, "checkpoints": 1, "sweep": 1}


def section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def code_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced block."""
    return [
        (m.group(1), m.group(2).splitlines())
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)
    ]


def command_lines() -> list[str]:
    """The `cbt-agent ...` lines of the section's sh blocks, comments cut."""
    out = []
    for lang, lines in code_blocks(section()):
        if lang == "sh":
            out += [ln.split("  #")[0].strip() for ln in lines if ln.startswith("cbt-agent ")]
    return out


def examples() -> list[tuple[str, list[str]]]:
    """(command, example output lines) for each `$ cbt-agent ...` in the section's blocks."""
    out: list[tuple[str, list[str]]] = []
    for lang, lines in code_blocks(section()):
        if lang == "sh":
            continue
        for ln in lines:
            if ln.startswith("$ cbt-agent "):
                out.append((ln[2:], []))
            elif out:
                out[-1][1].append(ln)
    return out


def documented_keys() -> dict[str, set[str]]:
    """`<command> --json` -> the JSON paths its table row documents (parents included)."""
    token = re.compile(r"^[a-zA-Z]+(\[\])?(\.[a-zA-Z]+(\[\])?)*(\.\{[a-zA-Z,]+\})?$")
    out: dict[str, set[str]] = {}
    for row in section().splitlines():
        m = re.match(r"^\| `(\w+) --json` \| (.*) \|$", row)
        if not m:
            continue
        paths: set[str] = set()
        for tok in re.findall(r"`([^`]+)`", m.group(2)):
            if not token.match(tok):
                continue  # a value, e.g. `qmp-socket`
            if ".{" in tok:
                head, names = tok.split(".{")
                leaves = [f"{head}.{n}" for n in names.rstrip("}").split(",")]
            else:
                leaves = [tok]
            for leaf in leaves:
                parts = leaf.split(".")
                for i in range(1, len(parts) + 1):
                    path = ".".join(parts[:i])
                    paths.add(path)
                    paths.add(path.removesuffix("[]"))
        out[m.group(1)] = {p for p in paths if not p.endswith("[]")}
    return out


def json_paths(value: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if k not in DYNAMIC:
                out |= json_paths(v, path)
    elif isinstance(value, list):
        for item in value:
            out |= json_paths(item, f"{prefix}[]")
    return out


def headers(lines: list[str]) -> list[list[str]]:
    """Table header lines: every word upper-case (a column may be two words)."""
    return [
        ln.split()
        for ln in lines
        if len(ln.split()) >= 3 and all(w.isupper() and w.isalpha() for w in ln.split())
    ]


def run(argv: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cbt_agent", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_section_documents_the_three_commands() -> None:
    lines = command_lines()
    for command in ("status", "checkpoints", "sweep", "tasks"):
        assert any(ln.split()[1] == command for ln in lines), command
    assert {c.split()[1] for c, _ in examples()} >= {"status", "checkpoints", "sweep"}
    assert set(documented_keys()) == {"status", "checkpoints", "sweep"}


async def test_readme_operator_commands_run_as_documented(
    vm_factory: Callable[..., stack.TestVm],
    agent_process: Callable[..., AgentProcess],
) -> None:
    vm = vm_factory(disks_mib=[16, 16])
    vol = vm.volumes[0].volume_uuid
    agent = agent_process("12400:12449")
    await agent.start()
    status, body = await agent.call(
        "POST", "/cbt-task/create", {"params": {"name": "nightly", "vmInstanceUuid": vm.vm_uuid}}
    )
    assert status == 200, body
    task = body["inventory"]["uuid"]
    names = []
    for offset in (0, 1 << 20):
        await vm.write(vol, offset, 65536, 0x5A)
        status, body = await agent.call("POST", f"/cbt-task/enable/{task}", {"params": {}})
        assert status == 200, body
        names.append(body["volumeCbtBackupInfos"][0]["bitmapName"])
        status, body = await agent.call("POST", f"/cbt-task/disable/{task}", {"params": {}})
        assert status == 200, body
    assert await agent.stop() == 0
    # behind the agent's back: a checkpoint removed, and a bitmap of a task nobody knows
    vm.qmp("block-dirty-bitmap-remove", {"node": vm.node_name(vol), "name": names[0]})
    vm.qmp(
        "block-dirty-bitmap-add",
        {"node": vm.node_name(vol), "name": "cbt-0f1e2d3c4b5a-000004", "persistent": True},
    )

    def argv(line: str) -> list[str]:
        line = line.replace("<vm uuid>", vm.vm_uuid).replace("<task uuid>", task)
        words = shlex.split(line)[1:]
        if "--apply" in words:  # the host is shared: only this test's VM is swept
            words += ["--vm", vm.vm_uuid]
        return words

    show = os.environ.get("CBT_SHOW_README_OUTPUT") == "1"  # prints them, to refresh the README
    keys = documented_keys()
    # the example outputs first (the stray is still there), then the command list in its order
    for line, example in examples():
        result = run(argv(line), agent.config)
        if show:
            print(f"$ {line}\n{result.stdout}")
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == EXIT[argv(line)[0]], (line, result.stdout, result.stderr)
        assert headers(example), f"README example of `{line}` shows no table header"
        for header in headers(example):
            assert header in headers(result.stdout.splitlines()), (line, header)
    for line in command_lines():
        words = argv(line)
        result = run(words, agent.config)
        if show:
            print(f"$ {line}\n{result.stdout}")
        assert "Traceback" not in result.stderr, result.stderr
        expected = 0 if "--apply" in words else EXIT[words[0]]
        assert result.returncode == expected, (line, result.stdout, result.stderr)
        if "--json" in words and words[0] in keys:
            assert json_paths(json.loads(result.stdout)) == keys[words[0]], line
