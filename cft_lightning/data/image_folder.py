"""Image folders, class lists, few-shot selection and the guidance Dataset (the metadata CSV: `metadata.py`).

Everything here is deterministic and independent of filesystem listing order: folders and files are sorted, and
the few-shot selection draws from numpy generators seeded by ``seed`` (and, per class, by the class name), so
every DDP rank and every machine picks the same images.
"""

from __future__ import annotations

import math
import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from cft_lightning.data.donors import DONOR_SEED, choose_donors, foreground_kind
from cft_lightning.data.image_io import IMAGE_EXTENSIONS as IMAGE_EXTENSIONS  # re-exported
from cft_lightning.data.image_io import is_image_file, load_image, skipped_summary
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.metadata import Metadata, is_int
from cft_lightning.data.metadata import read_metadata as read_metadata  # re-exported
from cft_lightning.data.resumable import sample_seed
from cft_lightning.data.transforms import JointTransform
from cft_lightning.errors import DataError

MISSING_MASK_POLICIES = ("error", "drop", "empty")


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in class-index order (timm's `ImageNetInfo`, the one source of ImageNet names)."""
    return list(_imagenet_info()[0])


def imagenet_class_names() -> dict[str, str]:
    """{WNID: readable name} for ImageNet-1k: the first lemma of timm's description ("n01440764" -> "tench")."""
    return dict(_imagenet_info()[1])


@lru_cache(maxsize=1)
def _imagenet_info() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    wnids = tuple(info.label_names())
    return wnids, tuple((w, info.index_to_description(i).split(",")[0].strip()) for i, w in enumerate(wnids))


def class_folders(root: str | os.PathLike[str], warn: bool = False, allow_flat: bool = False,
                  skipped: list[str] | None = None) -> list[str]:
    """Sorted names of the visible sub-directories of ``root``.

    Other visible entries (a README, stray files) are appended to ``skipped`` when given, else reported as
    ignored with ``warn``; image files directly in ``root`` are neither when ``allow_flat`` (they are then
    served as unlabelled images).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a directory")
    names = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            names.append(entry.name)
        elif allow_flat and is_image_file(entry.name):
            continue
        elif skipped is not None:
            skipped.append(entry.name)
        elif warn:
            rank_zero_warn(f"ignoring {entry.path}: not a class folder")
    return names


def resolve_class_list(classes: str | Sequence[str] | None, root: str | os.PathLike[str] | None = None) -> list[str]:
    """The label space: ``None`` -> sorted folder names of ``root``; ``"imagenet"`` -> the 1000 WNIDs;
    another string -> a text file with one class name per line (blank lines skipped); a list -> itself."""
    if classes is None:
        if root is None:
            raise DataError("classes=None needs an image folder root to list class folders from")
        names = class_folders(root)
        if not names:
            raise DataError(f"image folder {root} has no class sub-folders")
        return names
    if isinstance(classes, str):
        if classes == "imagenet":
            return imagenet_classes()
        path = Path(classes)
        if not path.is_file():
            raise DataError(f"class list file {classes} does not exist (use None, 'imagenet', a file or a list)")
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(path)
    else:
        names, source = [str(c) for c in classes], "the class list"
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates or not names:
        raise DataError(f"{source} must list distinct class names; duplicates: {duplicates[:5]}, size {len(names)}")
    return names


# ------------------------------------------------------------------------------------------------ scanning
def scan_image_folder(root: str | os.PathLike[str], allow_flat: bool = False,
                      skipped: list[str] | None = None) -> dict[str, list[str]]:
    """Map each class folder of ``root`` to its sorted image paths (POSIX, relative to ``root``).

    Sub-directories inside a class folder are searched recursively. Hidden entries are ignored; every other file
    that is not an image Pillow reads (`image_io.is_image_file`), and every non-folder entry of ``root`` itself,
    is skipped and named: appended to ``skipped`` (paths relative to ``root``) when given, else in one warning
    with the count and the first few. An empty class folder raises DataError naming it. With ``allow_flat``,
    images directly inside ``root`` are returned under the key ``""`` (unlabelled, for prediction).
    """
    root = Path(root)
    report = skipped is None
    skipped = [] if skipped is None else skipped
    first_skip = len(skipped)
    result: dict[str, list[str]] = {}
    for name in class_folders(root, allow_flat=allow_flat, skipped=skipped):
        found: list[str] = []
        others: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for f in sorted(filenames):
                if is_image_file(f):
                    found.append(f"{rel_dir}/{f}")
                elif not f.startswith("."):
                    others.append(f"{rel_dir}/{f}")
        if not found:
            what = f"only files that are not images Pillow reads: {', '.join(others[:5])}" if others else "no files"
            raise DataError(f"class folder {root / name} contains no images ({what})")
        skipped.extend(others)
        result[name] = sorted(found)
    if allow_flat:
        flat = sorted(e.name for e in os.scandir(root) if e.is_file() and is_image_file(e.name))
        if flat:
            result[""] = flat
    if not result:
        raise DataError(f"image folder {root} contains no class folders with images")
    if report and len(skipped) > first_skip:
        rank_zero_warn(skipped_summary(root, skipped[first_skip:]))
    return result


# ------------------------------------------------------------------------------------------------ few-shot selection
@dataclass(frozen=True)
class FewShotSelection:
    """Which classes and images are used for fine-tuning and for protocol validation."""

    fine_tuning_classes: list[str]
    held_out_classes: list[str]
    train: dict[str, list[str]]
    val: dict[str, list[str]]


def _class_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def select_few_shot(
    images_by_class: Mapping[str, Sequence[str]],
    images_per_class: int | None = None,
    class_fraction: float = 1.0,
    seed: int = 0,
    val_images_per_class: int = 0,
) -> FewShotSelection:
    """Choose fine-tuning classes and images deterministically.

    ``round_half_up(class_fraction * n_classes)`` classes (at least one) are drawn with
    ``numpy.random.default_rng(seed)`` from the sorted class names; the rest are held out. In each fine-tuning class
    ``images_per_class`` images (all if None) are drawn with a generator seeded by ``(seed, crc32(class name))``,
    so a class's pick does not depend on the other classes. Validation takes ``val_images_per_class`` images from
    each held-out class, or, if there are none, from the unused images of the fine-tuning classes.
    """
    if not 0.0 < class_fraction <= 1.0:
        raise DataError(f"class_fraction must be in (0, 1], got {class_fraction}")
    if images_per_class is not None and images_per_class < 1:
        raise DataError(f"images_per_class must be >= 1 or None, got {images_per_class}")
    names = sorted(images_by_class)
    n_chosen = max(1, min(len(names), math.floor(class_fraction * len(names) + 0.5)))
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = {names[i] for i in order[:n_chosen]}
    fine_tuning = [n for n in names if n in chosen]
    held_out = [n for n in names if n not in chosen]
    train: dict[str, list[str]] = {}
    val: dict[str, list[str]] = {}
    short = []
    for name in names:
        images = sorted(images_by_class[name])
        perm = _class_rng(seed, name).permutation(len(images))
        k = len(images) if images_per_class is None else images_per_class
        if name in chosen:
            if k > len(images):
                short.append(f"{name} ({len(images)})")
            train[name] = sorted(images[i] for i in perm[:k])
            if not held_out and val_images_per_class > 0:
                val[name] = sorted(images[i] for i in perm[k : k + val_images_per_class])
        elif val_images_per_class > 0:
            val[name] = sorted(images[i] for i in perm[:val_images_per_class])
    if short:
        rank_zero_warn(f"{len(short)} class(es) have fewer than {images_per_class} images, using all: {short[:5]}")
    return FewShotSelection(fine_tuning, held_out, train, {k: v for k, v in val.items() if v})


# ------------------------------------------------------------------------------------------------ samples
@dataclass(frozen=True)
class Sample:
    """One image: path relative to its root, label index (-1 if unlabelled) and group id (-1 if none)."""

    path: str
    label: int
    group: int = -1


def build_samples(
    images_by_class: Mapping[str, Sequence[str]],
    class_names: Sequence[str],
    metadata: Metadata | None = None,
    root: str | os.PathLike[str] = "",
) -> list[Sample]:
    """Attach labels (index in ``class_names``) and groups; a folder outside the class list or a CSV label that
    disagrees with the folder raises DataError (an integer CSV label is a class index, anything else a class name).
    The key ``""`` (flat, unlabelled folder) gets label -1 and its CSV labels are not checked."""
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for folder in sorted(images_by_class):
        if folder and folder not in index:
            raise DataError(
                f"class folder {Path(root) / folder} is not in the class list "
                f"({len(class_names)} classes, e.g. {list(class_names[:3])}); refusing to guess its label"
            )
        label = index[folder] if folder else -1
        for rel in images_by_class[folder]:
            if folder and metadata is not None and rel in metadata.labels:
                line, raw = metadata.labels[rel]
                ok = int(raw) == label if is_int(raw) else raw == folder
                if not ok:
                    raise DataError(
                        f"metadata CSV {metadata.path} line {line}: label {raw!r} for image {rel!r} disagrees with "
                        f"its folder {folder!r} (label {label})"
                    )
            group = metadata.groups.get(rel, -1) if metadata is not None else -1
            samples.append(Sample(rel, label, group))
    return samples


class GuidanceDataset(torch.utils.data.Dataset):
    """Images of one split with their guidance masks.

    An item is ``{"image": float (3, H, W) normalised, "label": int64 scalar, "masks": {kind: float32 (H, W) in
    {0, 1}}, "path": str (relative to root), "group": int64 scalar (-1 if none), "index": int64 scalar}``.

    Masks of ``mask_kinds`` are checked once, here, for every sample. ``missing_masks`` decides what a missing
    file does: ``"error"`` raises DataError (count and first files), ``"drop"`` removes the image (warning with the
    count), ``"empty"`` serves an all-zero mask (one warning). Kinds in ``optional_kinds`` exist for some images
    only by design (LVLM-VA's critic masks, for the alignment set): missing ones are all-zero, silently.

    With ``donors`` (for `cft test`'s background swap, docs/results.md) every item also carries another image
    of the split: ``"donor_image"`` (same transform), ``"donor_masks"`` ({foreground kind: mask}, the kind being
    ``object`` if loaded, else ``concept``), ``"donor_label"`` and ``"donor_index"``. Donors are fixed here, per
    sample (``donor_indices``, see `choose_donors`), so they do not depend on batching, shuffling or DDP ranks.
    Off by default: it doubles the image I/O.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        samples: Sequence[Sample],
        transform: JointTransform,
        mask_store: MaskStore | None = None,
        mask_kinds: Sequence[str] = (),
        missing_masks: str = "error",
        optional_kinds: Sequence[str] = (),
        donors: bool = False,
        donor_seed: int = DONOR_SEED,
    ) -> None:
        if missing_masks not in MISSING_MASK_POLICIES:
            raise DataError(f"missing_masks must be one of {MISSING_MASK_POLICIES}, got {missing_masks!r}")
        if mask_kinds and mask_store is None:
            raise DataError(f"mask kinds {list(mask_kinds)} requested but no mask store (data.masks) is given")
        self.root = Path(root)
        self.transform = transform
        self.mask_store = mask_store
        self.mask_kinds = list(mask_kinds)
        self.optional_kinds = [k for k in optional_kinds if k in self.mask_kinds]
        self.missing: set[tuple[str, str]] = set()
        self.samples = self._check_masks(list(samples), missing_masks)
        self.donor_kind: str | None = None
        self.donor_indices: np.ndarray | None = None
        if donors:
            self.donor_kind = foreground_kind(self.mask_kinds)
            if self.donor_kind is None:
                raise DataError(
                    f"donors for the background swap of {self.root} need an 'object' or 'concept' mask kind, "
                    f"got mask kinds {self.mask_kinds}"
                )
            self.donor_indices = choose_donors([s.label for s in self.samples], donor_seed)

    def _check_masks(self, samples: list[Sample], policy: str) -> list[Sample]:
        if not self.mask_kinds or self.mask_store is None:
            return samples
        store = self.mask_store
        owners: dict[Path, str] = {}
        for s in samples:
            key = store.path(s.path, self.mask_kinds[0])
            if key in owners:
                raise DataError(f"images {owners[key]!r} and {s.path!r} in {self.root} share the mask file {key}")
            owners[key] = s.path
        optional = set(self.optional_kinds)
        absent = [(s.path, k) for s in samples for k in self.mask_kinds if not store.has(s.path, k)]
        self.missing = {(rel, k) for rel, k in absent if k in optional}  # served as all-zero, by design
        missing = [(rel, k) for rel, k in absent if k not in optional]
        if not missing:
            return samples
        first = ", ".join(str(store.path(rel, k)) for rel, k in missing[:3])
        if policy == "error":
            raise DataError(
                f"{len(missing)} mask file(s) missing in {store.root} for images of {self.root}, e.g. {first}; "
                f"generate them or set data.missing_masks to 'drop' or 'empty'"
            )
        if policy == "drop":
            bad = {rel for rel, _ in missing}
            rank_zero_warn(f"dropping {len(bad)} image(s) of {self.root} without masks in {store.root}, e.g. {first}")
            return [s for s in samples if s.path not in bad]
        rank_zero_warn(f"using all-zero masks for {len(missing)} missing mask file(s) in {store.root}, e.g. {first}")
        self.missing |= set(missing)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def indices_with(self, kind: str) -> list[int]:
        """Positions of the samples whose `kind` mask exists in the store (not served as all-zero)."""
        return [i for i, s in enumerate(self.samples) if (s.path, kind) not in self.missing]

    def _read_mask(self, sample: Sample, kind: str, size: tuple[int, int]) -> np.ndarray:
        width, height = size
        if (sample.path, kind) in self.missing or self.mask_store is None:
            return np.zeros((height, width), dtype=bool)
        mask = self.mask_store.read(sample.path, kind)
        if mask.shape != (height, width):
            raise DataError(
                f"mask {self.mask_store.path(sample.path, kind)} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image "
                f"{self.root / sample.path} is {width}x{height}"
            )
        return mask

    def _load(self, index: int, epoch: int, kinds: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Transformed image and masks of ``kinds`` of sample ``index``."""
        sample = self.samples[index]
        image = load_image(self.root / sample.path)
        masks = {kind: self._read_mask(sample, kind, image.size) for kind in kinds}
        if getattr(self.transform, "train", False):  # augmentation seeded by (seed, epoch, sample)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(epoch, index))
                return self.transform(image, masks)
        return self.transform(image, masks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, index = divmod(int(index), len(self.samples))  # EpochShuffleSampler tags indices with the epoch
        sample = self.samples[index]
        image_tensor, mask_tensors = self._load(index, epoch, self.mask_kinds)
        item = {
            "image": image_tensor,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "masks": mask_tensors,
            "path": sample.path,
            "group": torch.tensor(sample.group, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }
        if self.donor_indices is not None and self.donor_kind is not None:
            donor = int(self.donor_indices[index])
            item["donor_image"], item["donor_masks"] = self._load(donor, epoch, [self.donor_kind])
            item["donor_label"] = torch.tensor(self.samples[donor].label, dtype=torch.int64)
            item["donor_index"] = torch.tensor(donor, dtype=torch.int64)
        return item
