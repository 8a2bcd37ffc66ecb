"""How `GuidanceDataModule`'s splits become DataLoaders: samplers, batch sizes, workers.

Training reseeds each epoch and draws the same global batches on any number of processes
(`resumable.EpochShuffleSampler`, `EpochSeededLoader`), or mixes alignment samples into every batch
(`alignment.AlignmentMixSampler`); validation and test give every image to exactly one DDP rank.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from cft_lightning.data.alignment import AlignmentMixSampler
from cft_lightning.data.image_folder import GuidanceDataset
from cft_lightning.data.resumable import EpochSeededLoader, EpochShuffleSampler, FitEpoch
from cft_lightning.errors import DataError

__all__ = ["SplitLoaders"]


class SplitLoaders:
    """Mixin of `GuidanceDataModule`: expects `trainer`, the `*_dataset` attributes, `batch_size`,
    `eval_batch_size`, `num_workers`, `pin_memory`, `alignment_kind`, `alignment_ratio` and `seed`."""

    trainer: Any
    train_dataset: GuidanceDataset | None
    val_dataset: GuidanceDataset | None
    test_dataset: GuidanceDataset | list[GuidanceDataset] | None
    predict_dataset: GuidanceDataset | None
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool
    alignment_kind: str | None
    alignment_ratio: float
    seed: int

    def _loader(self, dataset: GuidanceDataset | None, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        """Loader of a split; training's reseeds each epoch (`resumable.EpochSeededLoader`)."""
        if dataset is None:
            raise DataError(f"no {name} dataset: set data.{name}_root (or call setup for this stage first)")
        sampler = None
        trainer = self.trainer
        if name == "train":  # the same global batches on any number of processes (see EpochShuffleSampler)
            sampler = EpochShuffleSampler(
                dataset, num_replicas=trainer.world_size if trainer is not None else 1,
                rank=trainer.global_rank if trainer is not None else 0,
                seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), epoch=FitEpoch(self))
        elif name in ("val", "test") and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the last shard with repeated images, which the
            # metrics would count twice; this one gives every image to exactly one rank (shards may differ
            # in length by one, which the evaluation loops and torchmetrics' sum-reduced states handle).
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        extra: dict[str, Any] = {"epoch": FitEpoch(self)} if name == "train" else {}
        return (EpochSeededLoader if name == "train" else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        if self.alignment_kind is None or self.train_dataset is None:
            return self._loader(self.train_dataset, "train", True, self.batch_size)
        trainer = self.trainer
        sampler = AlignmentMixSampler(
            len(self.train_dataset), self.train_dataset.indices_with(self.alignment_kind), self.batch_size,
            self.alignment_ratio, seed=self.seed, num_replicas=trainer.world_size if trainer is not None else 1,
        )
        return EpochSeededLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                                 num_workers=self.num_workers, pin_memory=self.pin_memory,
                                 persistent_workers=self.num_workers > 0, epoch=FitEpoch(self))

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader; an empty list (Lightning then skips validation) when no image is left for it."""
        if self.val_dataset is not None and len(self.val_dataset) == 0:
            return []
        return self._loader(self.val_dataset, "val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        if isinstance(self.test_dataset, list):
            return [self._loader(d, "test", False, self.eval_batch_size) for d in self.test_dataset]
        return self._loader(self.test_dataset, "test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, "predict", False, self.eval_batch_size)
