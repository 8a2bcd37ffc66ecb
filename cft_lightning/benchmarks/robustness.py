"""The ImageNet robustness benchmarks as distributed: layouts, labels in the ImageNet-1k space, and scoring.

Every benchmark reads its root as the dataset ships it, maps its labels to ImageNet-1k indices (the sorted
WNID order, timm's and PyTorch's) and scores with its standard protocol through `target_rank`: the number
of scored classes that beat the true class, so top-k accuracy is `rank < k` for every protocol:

- `in_val`, `in_sketch`: `root/<wnid>/*`, 1000-way.
- `in_v2`: `root/<0..999>/*` (folder = class index, numeric, not string order), 1000-way.
- `in_a`, `in_r`: `root/<wnid>/*` (200 WNIDs) plus the distribution's `README.txt`; scored over their 200
  classes (logits restricted, hendrycks' and timm's protocol). `protocol="release"` scores all 1000 classes
  as the CFT release did (not comparable; labelled as such in the results).
- `objectnet`: `objectnet-1.0/{images/<folder>/*.png, mappings/*}`; the 113 classes that overlap ImageNet,
  resolved with the dataset's own mapping files; a prediction counts when it is any ImageNet class of the
  image's group (the official rule); 2-pixel border crop (the red frame). `release`: only the group's first
  class counts, no crop.
- `si_score_location|rotation|size`: `<variant>/<class name>/*.jpg` plus the distribution's CSVs, 1000-way,
  labels from SI-Score's class-name map (shipped in the package).

A root that does not look like the distribution (an unexpected file among the class folders, an empty or
unknown class folder, a missing mapping file) raises a `DataError` naming the path.
"""

from __future__ import annotations

import json
import os
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from cft_lightning.data.image_folder import imagenet_classes, is_image_file, load_image
from cft_lightning.data.image_io import skipped_summary
from cft_lightning.errors import DataError

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkDataset",
    "BenchmarkSample",
    "Protocol",
    "get_benchmark",
    "target_rank",
]

Protocol = Literal["standard", "release"]


@dataclass(frozen=True)
class BenchmarkSample:
    """One image: its path relative to the benchmark root and its label (ImageNet index, or group id for
    ObjectNet)."""

    path: str
    label: int


@cache
def _timm_info(name: str) -> list[str]:
    data = pkgutil.get_data("timm.data", f"_info/{name}")
    if data is None:
        raise DataError(f"timm's data file _info/{name} is missing (timm >= 0.9 ships it)")
    return data.decode("utf-8").split()


@cache
def _si_score_labels() -> dict[str, int]:
    data = pkgutil.get_data("cft_lightning", "_data/si_score_label_to_imagenet_index.json")
    assert data is not None
    return {k: int(v) for k, v in json.loads(data).items()}


def target_rank(logits: Tensor, labels: Tensor, columns: Tensor | None = None,
                groups: Tensor | None = None) -> Tensor:
    """(B,) number of scored classes whose logit beats the true class's: top-k hit iff rank < k.

    `columns`: the 1000-way indices scored (IN-A/IN-R's 200); labels are then positions in `columns`.
    `groups`: (G, 1000) bool, the ImageNet classes of each group (ObjectNet); labels are group ids and
    the true score is the group's best class, compared with every other class (the official rule).
    """
    if columns is not None:
        logits = logits[:, columns.to(logits.device)]
    if groups is not None:
        members = groups.to(logits.device)[labels]  # (B, 1000)
        true = logits.masked_fill(~members, float("-inf")).amax(dim=1, keepdim=True)
        return ((logits > true) & ~members).sum(dim=1)
    true = logits.gather(1, labels[:, None])
    return (logits > true).sum(dim=1)


@dataclass
class Benchmark:
    """A benchmark: how to list its images and labels, and how to score them.

    Attributes:
        name: registry key.
        title: name in tables.
        protocol: `standard` or `release` (see the module docstring).
        border: pixels cropped from each side before the model's transform (ObjectNet: 2).
        columns: for subset benchmarks, the scored 1000-way indices (labels are positions in it).
        groups: for ObjectNet, the (G, 1000) membership of each group.
        class_names: the name of each label (for per-class reports).
    """

    name: str
    title: str
    protocol: Protocol = "standard"
    border: int = 0
    columns: Tensor | None = None
    groups: Tensor | None = None
    class_names: list[str] = field(default_factory=list)

    def rank(self, logits: Tensor, labels: Tensor) -> Tensor:
        return target_rank(logits, labels, self.columns, self.groups)

    def imagenet_classes_of(self, labels: Tensor) -> list[set[int]]:
        """The ImageNet-1k indices each label stands for (for the fine-tuned vs held-out split)."""
        if self.groups is not None:
            return [set(torch.nonzero(self.groups[int(y)]).flatten().tolist()) for y in labels]
        if self.columns is not None:
            return [{int(self.columns[int(y)])} for y in labels]
        return [{int(y)} for y in labels]


# ------------------------------------------------------------------------------------------------ listing


def _class_dirs(root: Path, allowed_files: tuple[str, ...] = ()) -> list[Path]:
    """The class folders of `root`; files other than `allowed_files` (suffix or exact name) are an error."""
    if not root.is_dir():
        raise DataError(f"benchmark root {root} is not a directory")
    dirs, stray = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            dirs.append(entry)
        elif not any(entry.name == a or (a.startswith("*") and entry.name.endswith(a[1:])) for a in allowed_files):
            stray.append(entry)
    if stray:
        raise DataError(
            f"unexpected file {stray[0]} among the class folders of {root} ({len(stray)} such file(s)); "
            "is this the benchmark's root folder as distributed?"
        )
    if not dirs:
        raise DataError(f"benchmark root {root} has no class folders")
    return dirs


def _images(folder: Path, skipped: list[str]) -> list[Path]:
    """The images under a class folder; other files (not hidden ones) are appended to `skipped`, relative to
    the folder of class folders, for one warning per benchmark."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    images = [p for p in files if is_image_file(p.name)]
    if not images:
        raise DataError(f"class folder {folder} holds no image")
    skipped += [p.relative_to(folder.parent).as_posix() for p in files
                if not is_image_file(p.name) and not p.name.startswith(".")]
    return images


def _warn_skipped(where: Path, skipped: list[str]) -> None:
    if skipped:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(skipped_summary(where, skipped))


def _list(root: Path, label_of: dict[str, int], allowed_files: tuple[str, ...] = (),
          what: str = "class") -> list[BenchmarkSample]:
    samples, skipped = [], []
    for folder in _class_dirs(root, allowed_files):
        if folder.name not in label_of:
            raise DataError(f"folder {folder} is not a known {what} of this benchmark")
        label = label_of[folder.name]
        samples += [BenchmarkSample(p.relative_to(root).as_posix(), label) for p in _images(folder, skipped)]
    _warn_skipped(root, skipped)
    return samples


# ------------------------------------------------------------------------------------------------ benchmarks


def _imagenet(name: str, title: str, root: Path, protocol: Protocol) -> tuple[Benchmark, list[BenchmarkSample]]:
    wnids = imagenet_classes()
    samples = _list(root, {w: i for i, w in enumerate(wnids)})
    return Benchmark(name, title, protocol, class_names=list(wnids)), samples


def _in_v2(root: Path, protocol: Protocol) -> tuple[Benchmark, list[BenchmarkSample]]:
    samples = _list(root, {str(i): i for i in range(1000)}, what="class index folder (0..999)")
    return Benchmark("in_v2", "ImageNet-V2", protocol, class_names=list(imagenet_classes())), samples


def _subset(name: str, title: str, root: Path, protocol: Protocol, prefix: str) -> tuple[Benchmark, list]:
    wnids = _timm_info(f"{prefix}_synsets.txt")
    indices = [int(i) for i in _timm_info(f"{prefix}_indices.txt")]
    if protocol == "release":  # 1000-way, label = ImageNet index
        samples = _list(root, dict(zip(wnids, indices)), allowed_files=("README.txt",))
        return Benchmark(name, f"{title} (1000-way, release protocol)", protocol, class_names=list(
            imagenet_classes())), samples
    samples = _list(root, {w: k for k, w in enumerate(wnids)}, allowed_files=("README.txt",))
    return Benchmark(name, title, protocol, columns=torch.tensor(indices), class_names=list(wnids)), samples


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"ObjectNet mapping file {path} is missing (it ships in objectnet-1.0/mappings/)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"ObjectNet mapping file {path} is not valid JSON: {exc}") from exc


def objectnet_groups(mappings: Path) -> tuple[dict[str, str], list[str], list[list[int]]]:
    """From the dataset's mapping files: folder -> ObjectNet label, the 113 overlapping labels (sorted),
    and the ImageNet-1k indices of each (folder -> label -> ImageNet label strings -> 2012 line -> PyTorch)."""
    folder_to_label = _read_json(mappings / "folder_to_objectnet_label.json")
    to_imagenet = _read_json(mappings / "objectnet_to_imagenet_1k.json")
    pytorch_to_2012 = _read_json(mappings / "pytorch_to_imagenet_2012_id.json")
    lines_path = mappings / "imagenet_to_label_2012_v2"
    if not lines_path.is_file():
        raise DataError(f"ObjectNet mapping file {lines_path} is missing (it ships in objectnet-1.0/mappings/)")
    lines = [line.strip() for line in lines_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    line_of = {text: i for i, text in enumerate(lines)}
    pytorch_of = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    labels = sorted(to_imagenet)
    groups = []
    for label in labels:
        names = [n.strip() for n in to_imagenet[label].split(";") if n.strip()]
        missing = [n for n in names if n not in line_of or line_of[n] not in pytorch_of]
        if missing:
            raise DataError(f"{mappings}: ImageNet class {missing[0]!r} of ObjectNet class {label!r} is not in "
                            "imagenet_to_label_2012_v2 / pytorch_to_imagenet_2012_id.json")
        groups.append([pytorch_of[line_of[n]] for n in names])
    return folder_to_label, labels, groups


def _objectnet(root: Path, protocol: Protocol) -> tuple[Benchmark, list[BenchmarkSample]]:
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"ObjectNet root {root} has no images/ folder (point the root at objectnet-1.0)")
    folder_to_label, labels, groups = objectnet_groups(root / "mappings")
    label_id = {label: k for k, label in enumerate(labels)}
    samples, skipped = [], []
    for folder in _class_dirs(images):
        label = folder_to_label.get(folder.name)
        if label is None:
            raise DataError(f"folder {folder} is not in {root / 'mappings' / 'folder_to_objectnet_label.json'}")
        if label in label_id:  # only the 113 classes that overlap ImageNet are scored
            samples += [BenchmarkSample(p.relative_to(root).as_posix(), label_id[label])
                        for p in _images(folder, skipped)]
    _warn_skipped(images, skipped)
    if protocol == "release":  # only the group's first ImageNet class counts, 1000-way; no border crop
        first = [g[0] for g in groups]
        samples = [BenchmarkSample(s.path, first[s.label]) for s in samples]
        return Benchmark("objectnet", "ObjectNet (release protocol)", protocol,
                         class_names=list(imagenet_classes())), samples
    member = torch.zeros(len(groups), 1000, dtype=torch.bool)
    for k, g in enumerate(groups):
        member[k, g] = True
    return Benchmark("objectnet", "ObjectNet", protocol, border=2, groups=member, class_names=labels), samples


def _si_score(variant: str, root: Path, protocol: Protocol) -> tuple[Benchmark, list[BenchmarkSample]]:
    labels = _si_score_labels()
    samples = _list(root, labels, allowed_files=("*.csv",), what="SI-Score class")
    return Benchmark(f"si_score_{variant}", f"SI-Score {variant}", protocol,
                     class_names=list(imagenet_classes())), samples


BENCHMARKS = {
    "in_val": lambda root, p: _imagenet("in_val", "ImageNet val", root, p),
    "in_v2": _in_v2,
    "in_a": lambda root, p: _subset("in_a", "ImageNet-A", root, p, "imagenet_a"),
    "in_r": lambda root, p: _subset("in_r", "ImageNet-R", root, p, "imagenet_r"),
    "in_sketch": lambda root, p: _imagenet("in_sketch", "ImageNet-Sketch", root, p),
    "objectnet": _objectnet,
    "si_score_location": lambda root, p: _si_score("location", root, p),
    "si_score_rotation": lambda root, p: _si_score("rotation", root, p),
    "si_score_size": lambda root, p: _si_score("size", root, p),
}


def get_benchmark(name: str, root: str | os.PathLike[str], protocol: Protocol = "standard"
                  ) -> tuple[Benchmark, list[BenchmarkSample]]:
    """The benchmark `name` read from `root`: its scoring and its (path, label) samples."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if protocol not in ("standard", "release"):
        raise DataError(f"unknown protocol {protocol!r}; expected 'standard' or 'release'")
    return BENCHMARKS[name](Path(root), protocol)


class BenchmarkDataset(torch.utils.data.Dataset):
    """A benchmark's images in the data module's batch format (no masks, group -1), plus `class_split`:
    1 when the image's class was fine-tuned on, 0 when held out, -1 when that is unknown."""

    def __init__(self, root: str | os.PathLike[str], benchmark: Benchmark, samples: list[BenchmarkSample],
                 transform: Any, seen_classes: set[int] | None = None) -> None:
        self.root = Path(root)
        self.benchmark = benchmark
        self.samples = samples
        self.transform = transform
        labels = sorted({s.label for s in samples})
        if seen_classes is None:
            self._split = {y: -1 for y in labels}
        else:
            classes = benchmark.imagenet_classes_of(torch.tensor(labels))
            self._split = {y: int(bool(c & seen_classes)) for y, c in zip(labels, classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_image(self.root / sample.path)
        b = self.benchmark.border
        if b:
            if image.width <= 2 * b or image.height <= 2 * b:
                raise DataError(f"image {self.root / sample.path} is too small for the {b}-pixel border crop")
            image = image.crop((b, b, image.width - b, image.height - b))
        tensor, _ = self.transform(image, {})
        return {
            "image": tensor,
            "label": torch.tensor(sample.label, dtype=torch.int64),
            "masks": {},
            "path": sample.path,
            "group": torch.tensor(-1, dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "class_split": torch.tensor(self._split[sample.label], dtype=torch.int64),
        }
