"""`EpochSeededLoader`: a training DataLoader that reseeds every RNG from (global seed, epoch) when an epoch's
iterator is created, so a run resumed from an epoch-end checkpoint replays the following epochs exactly.

Lightning creates the first epoch's iterator (and prefetches a batch) before `on_train_epoch_start`, and a
resumed run's first iterator at another point than an uninterrupted run's; reseeding in a callback would
therefore leave the two runs on different random streams. Reseeding inside `DataLoader.__iter__` happens
before everything the epoch draws: the shuffle, the augmentations (drawn in the main process with
`num_workers: 0`), and then dropout. The epoch is Lightning's own count of processed epochs (the one it hands
to samplers' `set_epoch`); the seed is `seed_everything`'s (`PL_GLOBAL_SEED`): without one, nothing is
reseeded. With worker processes the workers' streams start from the loader's base seed, drawn here after the
reseed too, but persistent workers carry their state across epochs: bit-identical resumes need
`data.num_workers: 0` (resuming is correct either way).
"""

from __future__ import annotations

import os
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = ["EpochSeededLoader", "EpochShuffleSampler", "FitEpoch", "sample_seed"]


class FitEpoch:
    """Callable: the epoch the fit loop is in for `holder.trainer` (a LightningModule or LightningDataModule)."""

    def __init__(self, holder: Any) -> None:
        self.holder = holder

    def __call__(self) -> int:
        trainer = getattr(self.holder, "_trainer", None) or getattr(self.holder, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_progress.current.processed)


def sample_seed(epoch: int, index: int) -> int:
    """The seed of one training sample's augmentation in one epoch (from `seed_everything`'s seed)."""
    base = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return ((base * 1_000_003 + epoch) * 1_000_033 + index) % 2**63


class EpochShuffleSampler(DistributedSampler):
    """The training order: DistributedSampler's (a permutation drawn from seed + epoch, each rank taking every
    `num_replicas`-th index), whatever the number of processes, so the samples of global step k are the same
    on one process with batch B as on R processes with batch B / R. The epoch is read from the fit loop when
    iteration starts (right for a resumed run's first epoch, which Lightning starts before calling set_epoch),
    and every index is tagged with it (`epoch * len(dataset) + i`), so `GuidanceDataset` can seed each
    sample's augmentation by (seed, epoch, sample): the same crops and flips on any number of processes or
    workers, and after a resume."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, epoch: FitEpoch | None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.epoch_of = epoch

    def __iter__(self) -> Any:
        if self.epoch_of is not None:
            self.set_epoch(self.epoch_of())
        n = len(self.dataset)  # type: ignore[arg-type]
        return iter([self.epoch * n + int(i) for i in super().__iter__()])


class EpochSeededLoader(DataLoader):
    """A DataLoader whose `__iter__` first seeds torch, numpy and random from (PL_GLOBAL_SEED, epoch())."""

    def __init__(self, *args: Any, epoch: FitEpoch | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = epoch

    def __iter__(self) -> Any:
        seed = os.environ.get("PL_GLOBAL_SEED")
        if seed is not None and self.epoch is not None:
            from lightning.fabric.utilities.seed import seed_everything

            seed_everything((int(seed) * 1_000_003 + self.epoch()) % 2**32, workers=True, verbose=False)
            os.environ["PL_GLOBAL_SEED"] = seed  # keep the run's seed, not the epoch's, for the next epoch
        return super().__iter__()
