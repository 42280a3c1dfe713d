"""Reading and replacing a backup directory's manifest.json (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from cbt_agent.client.chain import MANIFEST_NAME, PART_SUFFIX, Manifest
from cbt_agent.client.errors import ManifestError
from cbt_agent.client.target import write_atomically


def manifest_path(dest: Path) -> Path:
    return dest / MANIFEST_NAME


def load_manifest(dest: Path) -> Manifest | None:
    """The directory's manifest, None when it has none; ManifestError when it is invalid."""
    path = manifest_path(dest)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e.message}") from None


def require_manifest(dest: Path) -> Manifest:
    m = load_manifest(dest)
    if m is None:
        raise ManifestError(f"{dest} is not a backup directory: no {MANIFEST_NAME}")
    return m


def save_manifest(dest: Path, m: Manifest) -> None:
    """Replace manifest.json: tmp file + fsync + rename + fsync of the directory."""
    data = (json.dumps(m.to_dict(), indent=2) + "\n").encode()
    write_atomically(manifest_path(dest), data, PART_SUFFIX)
