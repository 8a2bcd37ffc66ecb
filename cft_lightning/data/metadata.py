"""The metadata CSV of a split: per-image groups, labels and extra columns, keyed by path relative to its root."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field

from cft_lightning.data.mask_store import normalize_rel_path
from cft_lightning.errors import DataError

__all__ = ["Metadata", "is_int", "read_metadata"]


@dataclass
class Metadata:
    """Per-image rows of a metadata CSV, keyed by image path relative to its root.

    ``groups`` holds integer group ids: integer ``group`` values are kept, string values are numbered in sorted
    order (``group_names`` maps id -> name). Images absent from the CSV get group -1. ``labels`` keeps the raw
    ``label`` cell and its CSV line for consistency checks; ``extra`` holds all other columns as strings.
    """

    path: str
    groups: dict[str, int] = field(default_factory=dict)
    group_names: dict[int, str] = field(default_factory=dict)
    labels: dict[str, tuple[int, str]] = field(default_factory=dict)
    extra: dict[str, dict[str, str]] = field(default_factory=dict)


def read_metadata(path: str | os.PathLike[str]) -> Metadata:
    """Read a metadata CSV with column ``image`` and optional ``group``, ``label`` and extra columns."""
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = []
            for row in reader:  # cells beyond the header (key None) are dropped; missing cells read as ""
                rows.append((reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k}))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"metadata CSV {path} cannot be read: {exc}") from exc
    if "image" not in columns:
        raise DataError(f"metadata CSV {path} needs an 'image' column, found columns {columns}")
    meta = Metadata(path)
    raw_groups: dict[str, str] = {}
    for line, row in rows:
        try:
            rel = normalize_rel_path(row["image"])
        except DataError as exc:
            raise DataError(f"metadata CSV {path} line {line}: {exc}") from exc
        if rel in meta.extra:
            raise DataError(f"metadata CSV {path} line {line}: image {rel!r} is listed twice")
        if row.get("group", ""):
            raw_groups[rel] = row["group"]
        if row.get("label", ""):
            meta.labels[rel] = (line, row["label"])
        meta.extra[rel] = {k: v for k, v in row.items() if k not in ("image", "group", "label")}
    values = set(raw_groups.values())
    if all(is_int(v) for v in values):
        meta.groups = {rel: int(v) for rel, v in raw_groups.items()}
        meta.group_names = {int(v): v for v in sorted(values, key=int)}
    else:
        ids = {name: i for i, name in enumerate(sorted(values))}
        meta.groups = {rel: ids[v] for rel, v in raw_groups.items()}
        meta.group_names = {i: name for name, i in ids.items()}
    return meta


def is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
