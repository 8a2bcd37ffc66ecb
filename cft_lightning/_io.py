"""File helpers every stage shares: atomic writes and content hashes.

`atomic_write` is how every output file of the package is written (masks, manifests, concept banks, results,
reports, caches), so a killed process never leaves a half-written file; `file_sha256` pins an input file
(a concept bank, a start checkpoint) by its bytes. Standard library only: importing this module is free.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "file_sha256"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes (used to pin the concept bank in the manifest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process umask (Linux: read from /proc, which leaves it untouched; elsewhere set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, writer: Callable[[Any], None]) -> None:
    """Call ``writer(file_handle)`` on a temporary file next to ``path``, then rename it onto ``path``.

    The temporary name starts with a dot and ends in ``.tmp``, so scanners ignore it; it is removed on error. This
    protects against killed processes (the rename is atomic); it does not fsync, so it is not a power-loss guarantee.
    The file gets the permissions of a new file from ``open(path, "w")``: 0666 minus the process umask (mkstemp's
    private 0600 would make results unreadable to the group and others, unlike every other output).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp_name, 0o666 & ~_umask())
            writer(handle)
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
