"""Tiny deterministic synthetic dataset for the smoke config, ``make smoke`` and tests.

Each class is a coloured shape (circle, square, triangle, cross, diamond, ring, ellipse, bar) with two concept
parts drawn on it (a light "dot" and a dark "stripe"), placed at a random position and scale on a textured
background (``noise`` or ``stripes``; recorded as the image's group). Output under ``OUT_DIR``::

    images/{train,val,test}/<class>/<split>_<i>.png   file names are unique across splits (one mask store serves all)
    masks/                                             MaskStore: kinds ``object`` (whole shape) and ``concept``
                                                       (union of the parts), per-concept masks, manifest.json
    concepts.json                                      concept bank {class: [concept, ...]}
    metadata.csv                                       image (relative to its split root), group, label, split
    smoke_data.json                                    generation parameters

Pure numpy + PIL, deterministic for a seed (same bytes on every run), and a rerun skips files that exist.
Usage: ``python -m cft_lightning.smoke_data OUT_DIR [--classes 4 --per_class 6 --size 64 --seed 0]`` (or the options
from YAML: ``--config FILE``, ``--print_config``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from cft_lightning._io import atomic_write
from cft_lightning._tool_cli import Tool
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.errors import DataError

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "ellipse", "bar")
PALETTE = (
    (220, 40, 40),
    (40, 170, 60),
    (50, 90, 220),
    (230, 200, 30),
    (200, 60, 200),
    (30, 190, 200),
    (240, 130, 20),
    (120, 80, 40),
)
SPLITS = ("train", "val", "test")
BACKGROUNDS = ("noise", "stripes")
PART_NAMES = ("dot", "stripe")


def _generation_names(num_classes: int) -> list[str]:
    """Class names in generation order: class k is shape ``k % 8``, suffixed with a round number beyond eight."""
    names = []
    for k in range(num_classes):
        shape, rnd = SHAPES[k % len(SHAPES)], k // len(SHAPES)
        names.append(shape if rnd == 0 else f"{shape}{rnd + 1}")
    return names


def class_names(num_classes: int) -> list[str]:
    """Class names in label order (sorted, as the DataModule lists folders)."""
    return sorted(_generation_names(num_classes))


def concept_bank(names: list[str]) -> dict[str, list[str]]:
    """``{class: [concept, ...]}``: the two parts of each class's shape."""
    return {name: [f"{name} {part}" for part in PART_NAMES] for name in names}


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    dist2 = dy**2 + dx**2
    if shape == "circle":
        return dist2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)
    if shape == "cross":
        return ((np.abs(dx) <= r) & (np.abs(dy) <= 0.3 * r)) | ((np.abs(dx) <= 0.3 * r) & (np.abs(dy) <= r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "ring":
        return (dist2 <= r**2) & (dist2 >= (0.55 * r) ** 2)
    if shape == "ellipse":
        return (dx / r) ** 2 + (dy / (0.55 * r)) ** 2 <= 1.0
    return (np.abs(dx) <= r) & (np.abs(dy) <= 0.45 * r)  # bar


def render(class_index: int, size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One sample of generation class ``class_index``: ``image`` (size, size, 3) uint8, bool masks ``object``,
    ``dot`` and ``stripe``, and ``background`` (index into BACKGROUNDS, as a 0-d array)."""
    shape = SHAPES[class_index % len(SHAPES)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = size * rng.uniform(0.22, 0.32)
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    obj = _shape_mask(shape, yy, xx, cy, cx, r)
    dot_dy = 0.78 if shape == "ring" else 0.35
    dot = obj & ((yy - (cy + dot_dy * r)) ** 2 + (xx - cx) ** 2 <= (0.25 * r) ** 2)
    stripe = obj & (np.abs(yy - (cy - 0.4 * r)) <= 0.12 * r + 0.5) & ~dot

    background = int(rng.integers(len(BACKGROUNDS)))
    coarse = rng.uniform(0.15, 0.6, size=(size // 8 + 1, size // 8 + 1, 3))
    base = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    if BACKGROUNDS[background] == "stripes":
        period = rng.uniform(4.0, 9.0)
        base = base * (0.6 + 0.4 * (np.sin((xx + yy) * 2 * np.pi / period) > 0))[..., None]
    image = base + rng.normal(0.0, 0.05, size=(size, size, 3))
    rnd, colour = class_index // len(SHAPES), np.array(PALETTE[class_index % len(PALETTE)], dtype=np.float64) / 255
    colour = colour * (1.0 - 0.25 * rnd) if rnd else colour
    image[obj] = colour + rng.normal(0.0, 0.03, size=(int(obj.sum()), 3))
    image[dot] = 0.95
    image[stripe] = 0.08
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return {"image": pixels, "object": obj, "dot": dot, "stripe": stripe, "background": np.array(background)}


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, lambda handle: handle.write(data))


def generate(out_dir: str | Path, classes: int = 4, per_class: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write the dataset to ``out_dir`` (see module docstring) and return it; existing files are kept."""
    if classes < 1 or per_class < 1 or size < 16:
        raise DataError(
            f"smoke data needs classes >= 1, per_class >= 1, size >= 16; got {classes}, {per_class}, {size}"
        )
    out = Path(out_dir)
    params = {"classes": classes, "per_class": per_class, "size": size, "seed": seed, "format_version": 1}
    params_path = out / "smoke_data.json"
    if params_path.is_file() and json.loads(params_path.read_text(encoding="utf-8")) != params:
        raise DataError(f"{out} was generated with other parameters ({params_path}); use a new directory")
    out.mkdir(parents=True, exist_ok=True)
    names = class_names(classes)
    generation_index = {name: k for k, name in enumerate(_generation_names(classes))}
    bank = concept_bank(names)
    store = MaskStore(out / "masks")
    rows = ["image,group,label,split"]
    for split_index, split in enumerate(SPLITS):
        for name in names:
            k, parts = generation_index[name], bank[name]
            for i in range(per_class):
                rel = f"{name}/{split}_{i:03d}.png"
                sample = render(k, size, np.random.default_rng([seed, k, split_index, i]))
                rows.append(f"{rel},{BACKGROUNDS[int(sample['background'])]},{name},{split}")
                image_path = out / "images" / split / rel
                done = image_path.is_file() and all(store.has(rel, kind) for kind in ("object", "concept"))
                if done and all(store.has(rel, "concept", concept=c) for c in parts):
                    continue
                store.write(rel, "object", sample["object"])
                store.write(rel, "concept", sample["dot"] | sample["stripe"])
                store.write(rel, "concept", sample["dot"], concept=parts[0])
                store.write(rel, "concept", sample["stripe"], concept=parts[1])
                _write_if_changed(image_path, _png_bytes(sample["image"]))  # image last: it marks the sample done
    _write_if_changed(out / "metadata.csv", ("\n".join(rows) + "\n").encode("utf-8"))
    bank_path = out / "concepts.json"
    _write_if_changed(bank_path, (json.dumps(bank, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    manifest = store.read_manifest()
    if (manifest.get("concept_bank") or {}).get("path") != str(bank_path.resolve()) or not manifest["kinds"]:
        store.update_manifest(
            kinds=["concept", "object"],
            concept_bank=bank_path,
            models={"generator": "cft_lightning.smoke_data"},
            extra={"synthetic": params},
        )
    _write_if_changed(params_path, (json.dumps(params, sort_keys=True) + "\n").encode("utf-8"))
    return out


def smoke_data_command(out_dir: str, classes: int = 4, per_class: int = 6, size: int = 64, seed: int = 0) -> None:
    """Tiny deterministic synthetic dataset for the smoke config, ``make smoke`` and tests.

    Args:
        out_dir: output directory (created; existing files are kept)
        classes: number of classes (shapes)
        per_class: images per class and split
        size: image side in pixels
        seed: generation seed
    """
    out = generate(out_dir, classes, per_class, size, seed)
    print(f"smoke data: {classes * per_class * len(SPLITS)} images of {classes} classes ({size}px) in {out}")


TOOL = Tool(smoke_data_command, prog="python -m cft_lightning.smoke_data", positional=True)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    TOOL(argv)


if __name__ == "__main__":
    main()
