"""Importers: existing masks into the mask store, to reproduce the CFT release and RobustViT.

- ImageNet-S segmentation PNGs (`<wnid>/<image>.png`, the pixel's class id encoded as R + 256 * G, 0 the
  background, 1000 "ignore") become `object` masks: id not in {0, 1000}. This is the mask the release and
  RobustViT actually train on.
- A folder of binary PNG masks (`<rel path>.png`, values 0/255 or 0/1) becomes any mask kind.

The mask of image `<wnid>/<name>.JPEG` is stored under its relative path with the extension replaced, so
a source file `<wnid>/<name>.png` lands exactly where the dataset looks for it. Writes are atomic and
existing masks are kept unless `overwrite`; a progress bar counts the files, and the manifest records
where the masks came from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from cft_lightning.data.mask_store import MaskStore
from cft_lightning.errors import DataError

__all__ = ["imagenet_s_object_mask", "import_binary_masks", "import_imagenet_s"]

IGNORE_ID = 1000


def imagenet_s_object_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """(H, W) bool: the pixels of an ImageNet-S PNG whose class id R + 256 G is neither 0 nor 1000."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB")).astype(np.int64)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"ImageNet-S mask {path} cannot be read: {exc}") from exc
    ids = rgb[..., 0] + 256 * rgb[..., 1]
    return (ids != 0) & (ids != IGNORE_ID)


def _pngs(src: Path) -> list[Path]:
    if not src.is_dir():
        raise DataError(f"mask source {src} is not a directory")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"mask source {src} holds no .png file")
    return files


def _import(src: Path, store: MaskStore, kind: str, read, overwrite: bool, progress: bool, source: str) -> dict:
    from rich.progress import track

    counts = {"written": 0, "skipped": 0, "empty": 0}
    for path in track(_pngs(src), description=f"importing {kind} masks", disable=not progress):
        rel = path.relative_to(src).as_posix()
        if store.has(rel, kind) and not overwrite:
            counts["skipped"] += 1
            continue
        mask = read(path)
        counts["empty"] += int(not mask.any())
        store.write(rel, kind, mask)
        counts["written"] += 1
    store.update_manifest(kinds=[kind], extra={f"import_{kind}": {"source": str(src.resolve()), "format": source}})
    return counts


def import_imagenet_s(src: str | os.PathLike[str], store: str | os.PathLike[str], kind: str = "object",
                      overwrite: bool = False, progress: bool = True) -> dict[str, int]:
    """Import an ImageNet-S segmentation folder as binary `kind` masks; returns written/skipped/empty counts."""
    return _import(Path(src), MaskStore(store), kind, imagenet_s_object_mask, overwrite, progress, "imagenet-s")


def _binary(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"mask {path} cannot be read: {exc}") from exc
    values = np.unique(arr)
    if values.max(initial=0) <= 1:
        return arr > 0
    if not set(values.tolist()) <= {0, 255}:
        raise DataError(f"mask {path} is not binary (values {values[:6].tolist()}...); expected 0/255 or 0/1")
    return arr > 127


def import_binary_masks(src: str | os.PathLike[str], store: str | os.PathLike[str], kind: str,
                        overwrite: bool = False, progress: bool = True) -> dict[str, int]:
    """Import a folder of binary PNG masks as `kind` masks; returns written/skipped/empty counts."""
    return _import(Path(src), MaskStore(store), kind, _binary, overwrite, progress, "binary-png")
