"""`cbt-agent verify`: every file of every chain against its manifest sha256, and nothing in
the directory that the manifest does not know."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cbt_agent.client.chain import MANIFEST_NAME, PART_SUFFIX, files
from cbt_agent.client.manifest import require_manifest
from cbt_agent.client.target import sha256_file


@dataclass
class VerifyReport:
    lines: list[str] = field(default_factory=list)  # one per file, in the order checked
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def good(self, text: str) -> None:
        self.lines.append(text)

    def bad(self, text: str) -> None:
        self.lines.append(text)
        self.problems.append(text)


def verify(dest: Path) -> VerifyReport:
    """Hash every file the manifest lists and look for files it does not list. (Loading the
    manifest already checks that every chain is whole.)"""
    manifest = require_manifest(dest)
    report = VerifyReport()
    known = files(manifest)
    for name, disk in known.items():
        path = dest / name
        if not path.is_file():
            report.bad(f"MISSING  {name}")
            continue
        digest = sha256_file(path)
        if digest == disk.sha256:
            report.good(f"OK       {name}")
        else:
            report.bad(f"CORRUPT  {name}: sha256 {digest}, manifest says {disk.sha256}")
    for path in sorted(dest.iterdir()):
        if path.name == MANIFEST_NAME or path.name in known:
            continue
        if path.name.endswith(PART_SUFFIX):
            report.bad(f"LEFTOVER {path.name}: partial file of an interrupted backup")
        else:
            report.bad(f"UNKNOWN  {path.name}: not in the manifest")
    return report
