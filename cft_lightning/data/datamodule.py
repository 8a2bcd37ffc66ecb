"""``GuidanceDataModule``: few-shot image folder + mask store -> batches for explanation-guided fine-tuning.

Batch contract (default collate of :class:`~cft_lightning.data.image_folder.GuidanceDataset` items)::

    batch["image"]        float32 (B, 3, H, W), normalised with the model's mean/std
    batch["label"]        int64 (B,), index in ``class_names`` (-1 for unlabelled prediction images)
    batch["masks"][kind]  float32 (B, H, W), exactly 0 or 1, for each loaded mask kind
    batch["path"]         list of B str, image paths relative to the split's root (the mask-store key)
    batch["group"]        int64 (B,), group id from the metadata CSV (-1 if none)
    batch["index"]        int64 (B,), position in the split's dataset

With ``interventions`` the test splits that have masks also carry, per image, its background-swap donor
(another image of the split, fixed by the dataset; see ``GuidanceDataset``)::

    batch["donor_image"]        float32 (B, 3, H, W), the donor, transformed like the image
    batch["donor_masks"][kind]  float32 (B, H, W), the donor's foreground mask (kind ``object``, else ``concept``)
    batch["donor_label"]        int64 (B,), the donor's label (differs from ``label`` whenever the split allows)
    batch["donor_index"]        int64 (B,), the donor's position in the split's dataset
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from cft_lightning._plugins import Requirements
from cft_lightning.data.alignment import alignment_slots
from cft_lightning.data.benchmark_splits import BenchmarkSelection
from cft_lightning.data.image_folder import (
    MISSING_MASK_POLICIES,
    FewShotSelection,
    GuidanceDataset,
    Sample,
    build_samples,
    resolve_class_list,
    select_few_shot,
)
from cft_lightning.data.loaders import SplitLoaders
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.metadata import Metadata, read_metadata
from cft_lightning.data.run_files import RunFiles
from cft_lightning.data.transforms import Augmentation, JointTransform, build_transforms
from cft_lightning.errors import DataError
from cft_lightning.evaluation.test_plan import TestPlan, TestSplit


def _kinds_available(store: MaskStore, samples: Sequence[Sample], kinds: Sequence[str]) -> list[str]:
    """Kinds that the store has for every sample (for splits whose masks are optional); warns on partial kinds."""
    available = []
    for kind in kinds:
        present = sum(store.has(s.path, kind) for s in samples)
        if samples and present == len(samples):
            available.append(kind)
        elif present:
            rank_zero_warn(
                f"mask store {store.root}: kind {kind!r} exists for only {present}/{len(samples)} images "
                f"of this split; not loading it"
            )
    return available


class GuidanceDataModule(SplitLoaders, RunFiles, L.LightningDataModule):
    """Few-shot training images with guidance masks, plus validation, test and prediction splits.

    Training uses ``images_per_class`` images from each of ``round(class_fraction * n)`` classes of ``root``,
    chosen with ``seed`` (identical on every DDP rank and filesystem). Without ``val_root``, validation follows the
    CFT/RobustViT protocol: ``val_images_per_class`` images from every held-out class of ``root`` (or, if all
    classes are fine-tuned, unused images of those classes). Image sizes, mean/std and crop come from the model's
    timm data config. Files in the split folders that are not images Pillow reads are skipped and named: one
    warning per setup, and the full list in the run's log dir (`run_files.SKIPPED_FILE`).

    Args:
        root: Training image folder, laid out as ``root/<class>/<image>``.
        masks: Mask store root (see ``MaskStore``); required when ``mask_kinds`` is not empty.
        mask_kinds: Mask kinds to load for training and protocol validation, e.g. ``[concept]`` or
            ``[concept, object]``. Use ``[]`` for plain fine-tuning without masks.
        classes: Label space: ``null`` for the sorted folder names of ``root``, ``imagenet`` for the 1000
            ImageNet-1k WNIDs (labels are ImageNet indices), a path to a text file with one class per line, or a
            list of names. A folder outside this list is an error.
        images_per_class: Training images per fine-tuning class (``null`` for all).
        class_fraction: Fraction of the classes present in ``root`` used for fine-tuning; the rest are held out.
        seed: Seed of the class and image selection (independent of the training seed).
        val_root: Validation image folder; all its images are used, with masks of the kinds the store holds for
            all of them. If unset, validation images come from the held-out classes of ``root``.
        val_images_per_class: Validation images per held-out class when ``val_root`` is unset.
        test_root: Test image folder (all images; masks loaded when the store has them), or a mapping
            ``{split name: folder}`` for several test splits evaluated in one run (one dataloader each).
        predict_root: Folder for ``predict`` (class folders or a flat folder of unlabelled images).
        metadata: CSV with column ``image`` (path relative to its split's root) and optional ``group``, ``label``
            and extra columns; groups reach the batch (``-1`` for images not listed).
        missing_masks: What a missing mask file does for training/protocol validation: ``error``, ``drop`` the
            image, or use an all-zero (``empty``) mask.
        batch_size: Training batch size.
        eval_batch_size: Batch size of validation/test/predict loaders (defaults to ``batch_size``).
        num_workers: DataLoader worker processes (workers are persistent when > 0).
        pin_memory: Pin host memory in the DataLoaders (useful on GPU).
        data_config: timm data config (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``). If
            ``null``, it is read from the attached model's ``data_config`` attribute at setup.
        augmentation: Training augmentation after the resize: ``crop`` (``random`` or ``center``) and ``hflip``
            (flip probability; ``0`` for digits, text, mirror-sensitive classes). Keys left out keep the
            defaults, the CFT release's random crop and flip with p = 0.5. Evaluation never augments.
        alignment_kind: Mask kind that defines LVLM-VA's alignment set (``critic``): the training images with such
            a mask are mixed into every training batch at ``alignment_ratio`` (oversampled when few); the others
            get an all-zero mask of that kind. ``null`` (default): the regularizer's declared alignment set
            (``LVLMCritic``: its ``mask_kind`` and ``alignment_ratio``) if it has one, else ordinary batches.
            Set it only for a regularizer that declares none; if both are set they must agree.
        alignment_ratio: Share of each training batch drawn from the alignment set (rounded, at least one image).
        benchmarks: Robustness benchmark roots for ``test``, ``{name: folder}`` (names: ``in_val``, ``in_v2``,
            ``in_a``, ``in_r``, ``in_sketch``, ``objectnet``, ``si_score_location|rotation|size``, and ``imagenet_seg``:
            the path of ``gtsegs_ijcv.mat``, scored for relevance alignment only). A benchmark
            without a root here is looked up in the environment variable ``CFT_BENCHMARK_<NAME>``.
        benchmark_names: Which benchmarks ``test`` runs: ``null`` (default: every configured one), ``all`` (the
            same, and the unconfigured ones are named as skipped), a comma-separated string or a list (each must be
            configured), or ``none``.
        benchmark_protocol: ``standard`` (IN-A/IN-R over their 200 classes, ObjectNet's official group rule and
            border crop) or ``release`` (the CFT release: all 1000 classes, ObjectNet's first class, no crop).
        interventions: ``test`` also measures what the decisions rely on (docs/results.md): accuracy with the
            concept pixels filled from the object's colour (``acc1_concepts_removed``, needs ``concept`` masks)
            and on another image's background (``acc1_background_swapped``, ``bg_follow``, needs ``object`` or
            ``concept`` masks). It applies to the ``test_root`` splits whose masks the store holds for every
            image (``data.mask_kinds`` must list ``concept`` and/or ``object``); the robustness benchmarks have
            no masks and ImageNet-Segmentation no labels, so they are left out. Each image then loads a donor
            image as well (twice the test I/O).
    """

    def __init__(
        self,
        root: str,
        masks: str | None = None,
        mask_kinds: list[str] = ["concept"],  # noqa: B006 - copied below; jsonargparse shows it as the default
        classes: str | list[str] | None = None,
        images_per_class: int | None = 3,
        class_fraction: float = 0.5,
        seed: int = 0,
        val_root: str | None = None,
        val_images_per_class: int = 1,
        test_root: str | dict[str, str] | None = None,
        predict_root: str | None = None,
        metadata: str | None = None,
        missing_masks: str = "error",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        data_config: dict | None = None,
        augmentation: Augmentation = Augmentation(),  # noqa: B008 - frozen; jsonargparse shows it as the default
        alignment_kind: str | None = None,
        alignment_ratio: float = 0.5,
        benchmarks: dict[str, str] | None = None,
        benchmark_names: str | list[str] | None = None,
        benchmark_protocol: str = "standard",
        interventions: bool = False,
    ) -> None:
        super().__init__()
        for name, value, want_dir in (
            ("root", root, True),
            ("masks", masks, True),
            ("val_root", val_root, True),
            *((f"test_root.{k}" if isinstance(test_root, dict) else "test_root", v, True)
              for k, v in (test_root.items() if isinstance(test_root, dict) else [("", test_root)])),
            ("predict_root", predict_root, True),
            ("metadata", metadata, False),
        ):
            if value is None:
                continue
            if not os.path.exists(value):
                raise DataError(f"data.{name}: {value} does not exist")
            if want_dir != os.path.isdir(value):
                raise DataError(f"data.{name}: {value} must be a {'directory' if want_dir else 'file'}")
        if isinstance(classes, str) and classes != "imagenet" and not os.path.isfile(classes):
            raise DataError(f"data.classes: {classes} is neither 'imagenet' nor an existing class list file")
        if missing_masks not in MISSING_MASK_POLICIES:
            raise DataError(f"data.missing_masks must be one of {MISSING_MASK_POLICIES}, got {missing_masks!r}")
        if mask_kinds and masks is None:
            raise DataError(f"data.mask_kinds={list(mask_kinds)} needs data.masks (a mask store), or set mask_kinds=[]")
        if interventions and (masks is None or not {"concept", "object"} & set(mask_kinds)):
            raise DataError(
                "data.interventions needs masks to separate concept, object and background: set data.masks and "
                f"'concept' and/or 'object' in data.mask_kinds (got mask_kinds={list(mask_kinds)}, masks={masks})"
            )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or num_workers < 0:
            raise DataError("data.batch_size / eval_batch_size must be >= 1 and num_workers >= 0")
        self.root = root
        self.masks = masks
        self.mask_kinds = list(mask_kinds)
        self.classes = classes
        self.images_per_class = images_per_class
        self.class_fraction = class_fraction
        self.seed = seed
        self.val_root = val_root
        self.val_images_per_class = val_images_per_class
        self.test_root = test_root
        self.predict_root = predict_root
        self.metadata = metadata
        self.missing_masks = missing_masks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.data_config = data_config
        self.augmentation = Augmentation.parse(augmentation)
        self.alignment_kind: str | None = None
        self.alignment_ratio = alignment_ratio
        if alignment_kind is not None:
            self._set_alignment(alignment_kind, alignment_ratio, "data.alignment_kind")
        self.benchmark_selection = BenchmarkSelection(benchmarks or {}, benchmark_names, benchmark_protocol)
        self.interventions = interventions
        self._test_splits: tuple[TestSplit, ...] = ()  # set by setup("test"), described by `test_plan()`
        self._resolved_data_config: dict[str, Any] | None = None  # the config the transforms were built with
        self.train_dataset: GuidanceDataset | None = None
        self.val_dataset: GuidanceDataset | None = None
        self.test_dataset: GuidanceDataset | list[GuidanceDataset] | None = None
        self.predict_dataset: GuidanceDataset | None = None
        self._class_names: list[str] | None = None
        self._selection: FewShotSelection | None = None
        self._metadata: Metadata | None = None
        self._transforms: tuple[JointTransform, JointTransform] | None = None
        self.skipped_files: list[str] = []  # files of the scanned splits that are not images (root joined)
        self._reported_skips = 0

    # ---------------------------------------------------------------- label space and selection (lazy, cheap)
    @property
    def class_names(self) -> list[str]:
        """Class names in label order (only lists the folders of ``root``; no image scan)."""
        if self._class_names is None:
            self._class_names = resolve_class_list(self.classes, self.root)
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def selection(self) -> FewShotSelection:
        """The few-shot selection of ``root`` (scans ``root`` on first use)."""
        if self._selection is None:
            images = self._scan(self.root)
            # Check every image of root, not only the selected ones: unknown folders and CSV label conflicts.
            build_samples(images, self.class_names, self._read_metadata(), self.root)
            self._selection = select_few_shot(
                images, self.images_per_class, self.class_fraction, self.seed, self.val_images_per_class
            )
        return self._selection

    @property
    def fine_tuning_classes(self) -> list[str]:
        return self.selection.fine_tuning_classes

    @property
    def held_out_classes(self) -> list[str]:
        return self.selection.held_out_classes

    @property
    def group_names(self) -> dict[int, str]:
        """Group id -> name from the metadata CSV (empty without one)."""
        meta = self._read_metadata()
        return dict(meta.group_names) if meta is not None else {}

    def _read_metadata(self) -> Metadata | None:
        if self.metadata is not None and self._metadata is None:
            self._metadata = read_metadata(self.metadata)
        return self._metadata

    # ---------------------------------------------------------------- setup
    def _resolve_data_config(self) -> dict[str, Any]:
        if self.data_config is not None:
            return self.data_config
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        config = getattr(module, "data_config", None)
        if config is None:
            raise DataError(
                "data.data_config is not set and no attached model exposes `data_config`; pass data_config "
                "(timm.data.resolve_data_config(model=...)) or run the DataModule through a Trainer with the model"
            )
        return dict(config)

    def _samples(self, images: dict[str, list[str]], root: str) -> list[Sample]:
        meta = self._read_metadata()
        samples = build_samples(images, self.class_names, meta, root)
        if meta is not None and samples and not any(s.path in meta.extra for s in samples):
            rank_zero_warn(f"metadata CSV {meta.path} lists none of the {len(samples)} images of {root}; group -1")
        return samples

    def _optional_mask_dataset(self, root: str, transform: JointTransform, allow_flat: bool = False,
                               donors: bool = False) -> GuidanceDataset:
        """All images of ``root``, with the requested mask kinds that the store holds for every image; with
        ``donors``, background-swap donors when one of those kinds marks the foreground (else a warning)."""
        samples = self._samples(self._scan(root, allow_flat=allow_flat), root)
        store = MaskStore(self.masks) if self.masks is not None else None
        kinds = _kinds_available(store, samples, self.mask_kinds) if store is not None else []
        if donors and not {"concept", "object"} & set(kinds):
            rank_zero_warn(f"data.interventions: {root} has no 'concept' or 'object' mask for every image in "
                           f"{self.masks}; its concept-removal and background-swap metrics are skipped")
            donors = False
        return GuidanceDataset(root, samples, transform, store, kinds, "error", donors=donors)

    def _set_alignment(self, kind: str, ratio: float, source: str) -> None:
        """Mix `ratio` of every training batch from the images with a `kind` mask (LVLM-VA's alignment set)."""
        if self.masks is None:
            raise DataError(f"{source}: the alignment set {kind!r} needs data.masks (a mask store)")
        try:
            alignment_slots(self.batch_size, ratio)
        except ValueError as exc:
            raise DataError(f"{source}: alignment ratio {ratio} with batch_size {self.batch_size}: {exc}") from exc
        self.alignment_kind, self.alignment_ratio = kind, ratio
        if kind not in self.mask_kinds:
            self.mask_kinds = [*self.mask_kinds, kind]

    def _adopt_alignment(self) -> None:
        """The regularizer's declared alignment set (`Requirements.alignment`) is the one source of its mask kind
        and ratio: adopted here; `data.alignment_kind/_ratio`, if also set, must agree."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        requirements = getattr(module, "requirements", None)  # GuidedFineTuner: its regularizer's declaration
        if not isinstance(requirements, Requirements) or requirements.alignment is None:
            return
        kind, ratio = requirements.alignment
        if self.alignment_kind is not None and (self.alignment_kind, self.alignment_ratio) != (kind, ratio):
            raise DataError(
                f"data.alignment_kind/alignment_ratio ({self.alignment_kind!r}, {self.alignment_ratio}) differ from "
                f"the regularizer's alignment set ({kind!r}, {ratio}): leave them out, the data module takes the "
                "regularizer's"
            )
        if self.alignment_kind is None:
            self._set_alignment(kind, ratio, "model.regularizer alignment_ratio")

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (``fit``, ``validate``, ``test``, ``predict``; ``None`` = fit)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self._adopt_alignment()
        if self._transforms is None:
            self._resolved_data_config = dict(self._resolve_data_config())
            self._transforms = build_transforms(self._resolved_data_config, self.augmentation)
        train_tf, eval_tf = self._transforms
        store = MaskStore(self.masks) if self.masks is not None else None
        kinds, policy = self.mask_kinds, self.missing_masks
        if stage in (None, "fit") and self.train_dataset is None:
            selection = self.selection
            samples = self._samples(selection.train, self.root)
            optional = [self.alignment_kind] if self.alignment_kind else []
            self.train_dataset = GuidanceDataset(self.root, samples, train_tf, store, kinds, policy, optional)
            if len(self.train_dataset) == 0:
                raise DataError(f"data.root: no training images left in {self.root} (all dropped for missing masks)")
            if self.alignment_kind and not self.train_dataset.indices_with(self.alignment_kind):
                raise DataError(
                    f"data.alignment_kind: none of the {len(self.train_dataset)} training images of {self.root} has "
                    f"a {self.alignment_kind!r} mask in {self.masks}; run the critique stage first"
                )
        if stage in (None, "fit"):
            self._write_selection()
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            if self.val_root is not None:
                self.val_dataset = self._optional_mask_dataset(self.val_root, eval_tf)
            else:
                samples = self._samples(self.selection.val, self.root)
                if not samples:
                    rank_zero_warn(f"no validation images: {self.root} has no held-out class or unused image")
                self.val_dataset = GuidanceDataset(self.root, samples, eval_tf, store, kinds, policy)
        if stage == "test" and self.test_dataset is None:
            self._setup_test(eval_tf)
        if stage == "predict" and self.predict_dataset is None and self.predict_root is not None:
            self.predict_dataset = self._optional_mask_dataset(self.predict_root, eval_tf, allow_flat=True)
        self._report_skipped()

    def _setup_test(self, eval_tf: JointTransform) -> None:
        """The test splits: `test_root` (one folder or a mapping) first, then the selected benchmarks."""
        datasets: list[Any] = []
        splits: list[TestSplit] = []
        if self.test_root is not None:
            roots = self.test_root if isinstance(self.test_root, dict) else {"test": self.test_root}
            for name, root in roots.items():
                datasets.append(self._optional_mask_dataset(root, eval_tf, donors=self.interventions))
                splits.append(TestSplit(name))
        config = self._resolved_data_config or self._resolve_data_config()
        for split, dataset in self.benchmark_selection.test_splits(eval_tf, config, self._seen_imagenet_classes()):
            datasets.append(dataset)
            splits.append(split)
        if not datasets:
            raise DataError("nothing to test: set data.test_root or data.benchmarks (or CFT_BENCHMARK_<NAME>)")
        self.test_dataset = datasets if len(datasets) > 1 or isinstance(self.test_root, dict) else datasets[0]
        self._test_splits = tuple(splits)

    def _seen_imagenet_classes(self) -> set[int] | None:
        """ImageNet indices of the fine-tuning classes, when the label space is ImageNet-1k and root exists."""
        if self.classes != "imagenet" or not os.path.isdir(self.root):
            return None
        index = {name: i for i, name in enumerate(self.class_names)}
        return {index[c] for c in self.selection.fine_tuning_classes}

    def benchmark_roots(self) -> dict[str, str]:
        """Every benchmark with a root (`BenchmarkSelection.configured`)."""
        return self.benchmark_selection.configured()

    @property
    def test_split_names(self) -> list[str]:
        """Names of the test splits, in dataloader order (`["test"]` for a single test_root); the benchmarks are
        known after `setup("test")`."""
        if self._test_splits:
            return [s.name for s in self._test_splits]
        return list(self.test_root) if isinstance(self.test_root, dict) else ["test"]

    def test_plan(self) -> TestPlan:
        """What `cft test` evaluates (`evaluation.test_plan`; the model receives it in `setup`): the splits of
        `setup("test")` (none before), class names, metadata groups and the images' data config."""
        try:
            class_names: list[str] | None = self.class_names
        except DataError:  # no class list to name the outputs by: indices are shown
            class_names = None
        return TestPlan(splits=self._test_splits, class_names=class_names, group_names=self.group_names,
                        data_config=self.data_config or self._resolved_data_config)
