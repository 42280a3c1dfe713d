"""`cbt-agent verify`: every file of every chain against its manifest sha256, its qcow2 header
and the backing chain qemu really follows (`images.py`), and nothing in the directory that the
manifest does not know."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cbt_agent.client.chain import MANIFEST_NAME, PART_SUFFIX, chain_of, files
from cbt_agent.client.errors import BackupError
from cbt_agent.client.images import backing_chain_problem, file_problem
from cbt_agent.client.manifest import require_manifest
from cbt_agent.client.target import path_in, sha256_file


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
    """Hash and inspect every file the manifest lists, check each chain as qemu follows it, and
    look for files it does not list. (Loading the manifest already checks every name and that
    every chain is whole in the manifest.)"""
    manifest = require_manifest(dest)
    report = VerifyReport()
    known = files(manifest)
    good: set[str] = set()
    paths: dict[str, Path | str] = {}  # a path to check, or why it cannot be
    for name in known:
        try:
            path = path_in(dest, name)
        except BackupError as e:
            paths[name] = f"UNSAFE   {name}: {e.message}"
            continue
        paths[name] = path if path.is_file() else f"MISSING  {name}"
    # every file hashed and its header read at once: the hashes run on all cores (hashlib
    # releases the GIL), the largest first (it is the longest), qemu-img beside them. The
    # files are read past the page cache: a store is read once, and is no reason to evict
    # what the host has cached
    todo = {n: p for n, p in paths.items() if isinstance(p, Path)}
    largest_first = sorted(todo, key=lambda n: _size(todo[n]), reverse=True)
    workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = {n: pool.submit(sha256_file, todo[n], direct=True) for n in largest_first}
        headers = {n: pool.submit(file_problem, dest, known[n]) for n in todo}
        for name, disk in known.items():
            where = paths[name]
            if isinstance(where, str):
                report.bad(where)
                continue
            digest = digests[name].result()
            if digest != disk.sha256:
                report.bad(f"CORRUPT  {name}: sha256 {digest}, manifest says {disk.sha256}")
                continue
            problem = headers[name].result()
            if problem is not None:
                report.bad(f"UNSAFE   {name}: {problem}")
                continue
            good.add(name)
            report.good(f"OK       {name}")
        problems = []
        for cp in manifest.checkpoints:
            for top in cp.disks:
                chain = chain_of(manifest, cp.name, top.volume_uuid)
                if not all(d.file in good for d in chain):
                    continue  # its bad file is reported above; qemu is not asked to open it
                problems.append((top.file, pool.submit(backing_chain_problem, dest, chain)))
        for top_file, future in problems:
            problem = future.result()
            if problem is not None:
                report.bad(f"UNSAFE   {top_file}: {problem}")
    for path in sorted(dest.iterdir()):
        if path.name == MANIFEST_NAME or path.name in known:
            continue
        if path.name.endswith(PART_SUFFIX):
            report.bad(f"LEFTOVER {path.name}: partial file of an interrupted backup")
        else:
            report.bad(f"UNKNOWN  {path.name}: not in the manifest")
    return report


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # its hashing reports why
