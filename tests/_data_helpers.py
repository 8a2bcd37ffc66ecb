"""Helpers for the data-layer tests: tiny image folders and mask stores written into tmp_path."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from cft_lightning.data.mask_store import MaskStore

# Deliberately not 0.5/0.5, so tests notice hard-coded normalisation.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def random_rgb(rng: np.random.Generator, height: int = 32, width: int = 32) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_image(path: Path, array: np.ndarray, mode: str | None = None, fmt: str | None = None) -> Path:
    """Save ``array`` as an image (optionally converted to ``mode``) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode is not None:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_folder(
    root: Path,
    counts: dict[str, int],
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    order: Iterable[tuple[str, int]] | None = None,
    ext: str = ".png",
) -> list[str]:
    """Write ``counts[cls]`` random images per class as ``root/cls/img_XXX<ext>``; return the sorted rel paths.

    ``order`` gives the (class, index) creation order (to test independence of filesystem order); image content
    depends only on (seed, class, index).
    """
    items = list(order) if order is not None else [(c, i) for c, n in counts.items() for i in range(n)]
    rels = []
    for cls, i in items:
        rng = np.random.default_rng([seed, sum(cls.encode()), i])
        rel = f"{cls}/img_{i:03d}{ext}"
        write_image(root / rel, random_rgb(rng, *size))
        rels.append(rel)
    return sorted(rels)


def make_masks(
    store_root: Path, rels: Iterable[str], kinds: Iterable[str] = ("concept",), size: tuple[int, int] = (32, 32)
) -> MaskStore:
    """Write a centred-square mask of each kind for each rel path."""
    store = MaskStore(store_root)
    height, width = size
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    for rel in rels:
        for kind in kinds:
            store.write(rel, kind, mask)
    return store
