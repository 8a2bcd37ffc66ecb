"""Shortcut-parts: a procedurally generated spurious-correlation benchmark shipped in the package.

Every class is a creature with the same body and a fixed pair of parts (concepts: "round eye", "striped
fin", "forked tail", "spotted belly", "pointed horn"); each part is shared by several classes, so only the
combination identifies the class. Each class also has "its" background, which it stands on with
probability `spurious_rate` in the training, validation and in-distribution test splits (the shortcut), and
which is independent of the class in the out-of-distribution split (every class on every background, in
equal numbers). Optionally a small coloured decoy square carries the class too (DecoyMNIST-style).

On disk, in the same format as real data (`docs/data.md`), written once into a cache folder:

    images/{train,val,test_id,test_ood}/<class>/<split>_<i>.png
    masks/            mask store: object, concept (union of parts), per-concept masks, decoy (with decoy=True)
    concepts.json     the concept bank {class: [concept, ...]}, as the LLM stage produces it
    metadata.csv      image, group ("<class>|<background>"), label, split, background, group_id
                      (= label * num_backgrounds + background); in the decoy-only variant
                      (`background_shortcut=False`) groups are "<class>|decoy <colour's class>" instead
    benchmark.json    the spec and every file's size and sha256; written last: a folder without it is incomplete

Deterministic: sample i of a split and class is drawn from its own seeded generator, so any missing or
damaged file is regenerated bit-identically.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cft_lightning._io import atomic_write, file_sha256
from cft_lightning.benchmarks._parts_render import BACKGROUNDS, PARTS, Rendered, render
from cft_lightning.data.mask_store import MaskStore, concept_slug
from cft_lightning.errors import DataError

__all__ = ["SPLITS", "ShortcutPartsSpec", "build_shortcut_parts", "class_parts", "default_cache_dir"]

FORMAT_VERSION = 3  # bump whenever the drawing changes: caches of older drawings are rebuilt
SPLITS = ("train", "val", "test_id", "test_ood")
CLASS_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
MANIFEST = "benchmark.json"
Verify = Literal["none", "sizes", "full"]


@dataclass(frozen=True)
class ShortcutPartsSpec:
    """What to generate.

    Attributes:
        num_classes: 2..10 classes (classes 7-10 use the fifth part, the horn).
        image_size: side of the square images in pixels.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        test_per_class: images per class in each test split.
        spurious_rate: probability that a train/val/test_id image shows its class's background (and decoy).
        decoy: also draw a class-coloured decoy square in a corner (same rate; random in test_ood).
        background_shortcut: the background carries the class (the default). False, with `decoy`, is the
            DecoyMNIST-style variant: backgrounds are drawn at random in every split, the decoy colour alone
            carries the class (balanced over classes in test_ood), and groups are (class, decoy colour).
        decoy_side: side of the decoy square in pixels (None: max(3, image_size // 12)).
        seed: generation seed.
    """

    num_classes: int = 6
    image_size: int = 64
    train_per_class: int = 200
    val_per_class: int = 20
    test_per_class: int = 96
    spurious_rate: float = 0.95
    decoy: bool = False
    background_shortcut: bool = True
    decoy_side: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_NAMES):
            raise DataError(f"shortcut-parts: num_classes must be in [2, {len(CLASS_NAMES)}], got {self.num_classes}")
        if self.image_size < 32:
            raise DataError(f"shortcut-parts: image_size must be >= 32, got {self.image_size}")
        if min(self.train_per_class, self.val_per_class, self.test_per_class) < 1:
            raise DataError("shortcut-parts: every split needs at least one image per class")
        if not 0.0 <= self.spurious_rate <= 1.0:
            raise DataError(f"shortcut-parts: spurious_rate must be in [0, 1], got {self.spurious_rate}")
        if self.decoy_side is not None and not 2 <= self.decoy_side <= self.image_size // 3:
            raise DataError(f"shortcut-parts: decoy_side must be in [2, image_size // 3], got {self.decoy_side}")
        if not (self.background_shortcut or self.decoy):
            raise DataError("shortcut-parts: background_shortcut=False needs decoy=True (else nothing is spurious)")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class}.get(split, self.test_per_class)

    @property
    def key(self) -> str:
        """Short hash naming the cache folder of this spec."""
        text = json.dumps({**asdict(self), "format_version": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def class_parts(num_classes: int) -> dict[str, tuple[str, str]]:
    """The two parts of each class: all pairs of the first four parts, then pairs with the horn."""
    pairs = list(itertools.combinations(PARTS[:4], 2)) + [(p, PARTS[4]) for p in PARTS[:4]]
    return {CLASS_NAMES[c]: pairs[c] for c in range(num_classes)}


def default_cache_dir() -> Path:
    """`$CFT_CACHE` or `~/.cache/cft_lightning`."""
    return Path(os.environ.get("CFT_CACHE") or Path.home() / ".cache" / "cft_lightning")


def _cues(spec: ShortcutPartsSpec, split_index: int, label: int, i: int,
          rng: np.random.Generator) -> tuple[int, int | None]:
    """(background, decoy colour or None) of a sample: the class's own with probability `spurious_rate`
    except in test_ood, where every class appears on every background in equal numbers."""
    n_bg = spec.num_classes
    if not spec.background_shortcut:  # DecoyMNIST-style: only the decoy carries the class
        background = int(rng.integers(n_bg))
        if SPLITS[split_index] == "test_ood":
            return background, (i + label) % n_bg
        other = int((label + 1 + rng.integers(n_bg - 1)) % n_bg)
        return background, (label if rng.random() < spec.spurious_rate else other)
    if SPLITS[split_index] == "test_ood":
        return (i + label) % n_bg, (int(rng.integers(n_bg)) if spec.decoy else None)
    background = label if rng.random() < spec.spurious_rate else int((label + 1 + rng.integers(n_bg - 1)) % n_bg)
    decoy = None
    if spec.decoy:
        decoy = label if rng.random() < spec.spurious_rate else int((label + 1 + rng.integers(n_bg - 1)) % n_bg)
    return background, decoy


def _rng(spec: ShortcutPartsSpec, split_index: int, label: int, i: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, split_index, label, i])


def _draw(spec: ShortcutPartsSpec, split_index: int, label: int, i: int) -> Rendered:
    """Sample i of class `label` in split SPLITS[split_index]."""
    rng = _rng(spec, split_index, label, i)
    background, decoy = _cues(spec, split_index, label, i, rng)
    parts = class_parts(spec.num_classes)[CLASS_NAMES[label]]
    return render(parts, background, spec.image_size, rng, decoy=decoy, decoy_side=spec.decoy_side)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _sample_files(spec: ShortcutPartsSpec, split: str, name: str, i: int) -> list[tuple[str, str]]:
    """(kind, relative path under the folder) of every file of one sample."""
    rel = f"{name}/{split}_{i:04d}.png"
    files = [("image", f"images/{split}/{rel}"), ("object", f"masks/object/{rel}"),
             ("concept", f"masks/concept/{rel}")]
    files += [(f"concept:{p}", f"masks/concepts/{concept_slug(p)}/{rel}") for p in class_parts(spec.num_classes)[name]]
    if spec.decoy:
        files.append(("decoy", f"masks/decoy/{rel}"))
    return files


def _write_sample(out: Path, spec: ShortcutPartsSpec, split_index: int, label: int, i: int) -> None:
    name, split = CLASS_NAMES[label], SPLITS[split_index]
    sample = _draw(spec, split_index, label, i)
    masks = {"object": sample.object, "concept": sample.concept, "decoy": sample.decoy}
    masks.update({f"concept:{p}": m for p, m in sample.parts.items()})
    for kind, rel in _sample_files(spec, split, name, i):
        array = sample.image if kind == "image" else masks[kind].astype(np.uint8) * 255
        data = _png(array)
        atomic_write(out / rel, lambda fh, data=data: fh.write(data))


def _read_manifest(out: Path, spec: ShortcutPartsSpec) -> dict | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or half-written: the folder is incomplete
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("spec") != asdict(spec):
        return None
    return manifest


def _damaged(out: Path, manifest: dict, verify: Verify) -> set[str]:
    bad = set()
    for rel, (size, digest) in manifest["files"].items():
        path = out / rel
        try:
            if path.stat().st_size != size or (verify == "full" and file_sha256(path) != digest):
                bad.add(rel)
        except OSError:
            bad.add(rel)
    return bad


def _progress(items: list, description: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


def build_shortcut_parts(
    root: str | os.PathLike[str] | None = None,
    spec: ShortcutPartsSpec | None = None,
    verify: Verify = "sizes",
    progress: bool = True,
) -> Path:
    """Generate the benchmark (or check and reuse it) and return its folder.

    `root` defaults to `<cache>/shortcut_parts-<spec key>`. An existing folder is checked against its
    `benchmark.json` (`verify`: `sizes` stats every file, `full` also compares sha256, `none` trusts the
    manifest); missing or damaged files are regenerated, a missing or unreadable manifest means the whole
    folder is rebuilt (deterministically, so intact files come out identical).
    """
    spec = spec or ShortcutPartsSpec()
    out = Path(root) if root is not None else default_cache_dir() / f"shortcut_parts-{spec.key}"
    manifest = _read_manifest(out, spec)
    if manifest is not None and manifest.get("complete"):
        damaged = set() if verify == "none" else _damaged(out, manifest, verify)
        if not damaged:
            return out
    else:
        damaged = None  # everything
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # until every file is right again, the folder reads as incomplete
    names = list(class_parts(spec.num_classes))
    todo = []
    for s, split in enumerate(SPLITS):
        for label, name in enumerate(names):
            for i in range(spec.per_class(split)):
                files = {rel for _, rel in _sample_files(spec, split, name, i)}
                if damaged is None or files & damaged:
                    todo.append((s, label, i))
    for s, label, i in _progress(todo, f"shortcut-parts: drawing {len(todo)} images", progress):
        _write_sample(out, spec, s, label, i)
    _write_tables(out, spec)
    _write_manifest(out, spec)
    return out


def _write_tables(out: Path, spec: ShortcutPartsSpec) -> None:
    bank = {name: list(parts) for name, parts in class_parts(spec.num_classes).items()}
    rows = ["image,group,label,split,background,group_id"]
    for s, split in enumerate(SPLITS):
        for label, name in enumerate(bank):
            for i in range(spec.per_class(split)):
                background, decoy = _cues(spec, s, label, i, _rng(spec, s, label, i))
                bg_name = BACKGROUNDS[background][0]
                if spec.background_shortcut:
                    group, group_name = label * spec.num_classes + background, f"{name}|{bg_name}"
                else:  # groups by the decoy, the only shortcut
                    group, group_name = label * spec.num_classes + decoy, f"{name}|decoy {CLASS_NAMES[decoy]}"
                rows.append(f"{name}/{split}_{i:04d}.png,{group_name},{name},{split},{bg_name},{group}")
    for rel, text in (("metadata.csv", "\n".join(rows) + "\n"),
                      ("concepts.json", json.dumps(bank, indent=2) + "\n")):
        atomic_write(out / rel, lambda fh, text=text: fh.write(text.encode("utf-8")))
    store = MaskStore(out / "masks")
    store.update_manifest(
        kinds=["object", "concept", *(["decoy"] if spec.decoy else [])],
        concept_bank=out / "concepts.json",
        models={"generator": "cft_lightning.benchmarks.shortcut_parts"},
        extra={"shortcut_parts": asdict(spec)},
    )


def _write_manifest(out: Path, spec: ShortcutPartsSpec) -> None:
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(out).as_posix()
        files[rel] = [path.stat().st_size, file_sha256(path)]
    manifest = {"format_version": FORMAT_VERSION, "spec": asdict(spec), "complete": True, "files": files}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write(out / MANIFEST, lambda fh: fh.write(text.encode("utf-8")))
