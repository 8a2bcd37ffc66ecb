"""Alignment-set mixing (LVLM-VA's training recipe): every batch holds a fixed share of alignment samples.

The alignment samples are the training images that carry a corrective mask (mask kind `critic`); they
are few, so they are oversampled: their stream cycles through fresh permutations as often as needed,
while the rest of each batch walks once per epoch through a permutation of the whole training set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

__all__ = ["AlignmentMixSampler", "alignment_slots"]


def alignment_slots(batch_size: int, ratio: float) -> int:
    """Alignment samples per batch: round(ratio * batch_size), at least 1 and leaving at least 1 other slot."""
    if batch_size < 2:
        raise ValueError(f"alignment mixing needs batch_size >= 2, got {batch_size}")
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"alignment_ratio must lie in (0, 1), got {ratio}")
    return min(max(1, round(ratio * batch_size)), batch_size - 1)


class AlignmentMixSampler(Sampler[int]):
    """Indices such that every run of `batch_size` consecutive indices of one replica holds exactly
    `alignment_slots(batch_size, ratio)` alignment samples (use with `DataLoader(batch_size, drop_last=True)`).

    For DDP, the streams of the `num_replicas` ranks are interleaved (position `t * R + r` belongs to rank r),
    which is how Lightning's `DistributedSamplerWrapper` (shuffle off for custom samplers) shards a sampler:
    each rank then reads its own mixed batches. `set_epoch` (called by Lightning) reshuffles.
    """

    def __init__(
        self,
        num_samples: int,
        alignment_indices: Sequence[int],
        batch_size: int,
        ratio: float,
        seed: int = 0,
        num_replicas: int = 1,
    ) -> None:
        if not alignment_indices:
            raise ValueError("the alignment set is empty: no training image has a corrective mask")
        if num_samples < 1 or num_replicas < 1:
            raise ValueError("num_samples and num_replicas must be >= 1")
        self.num_samples = num_samples
        self.alignment_indices = torch.as_tensor(list(alignment_indices), dtype=torch.long)
        self.batch_size = batch_size
        self.slots = alignment_slots(batch_size, ratio)
        self.seed = seed
        self.num_replicas = num_replicas
        self.epoch = 0
        others = batch_size - self.slots
        self.batches_per_replica = math.ceil(num_samples / (others * num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_replica * self.batch_size * self.num_replicas

    def _cycle(self, values: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
        rounds = math.ceil(count / len(values))
        return torch.cat([values[torch.randperm(len(values), generator=gen)] for _ in range(rounds)])[:count]

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_batches = self.batches_per_replica * self.num_replicas
        others = self.batch_size - self.slots
        main = self._cycle(torch.arange(self.num_samples), n_batches * others, gen).view(n_batches, others)
        align = self._cycle(self.alignment_indices, n_batches * self.slots, gen).view(n_batches, self.slots)
        batches = torch.cat([align, main], dim=1)  # (n_batches, batch_size); batch g goes to rank g % R
        streams = batches.view(self.batches_per_replica, self.num_replicas, self.batch_size).transpose(0, 1)
        streams = streams.reshape(self.num_replicas, -1)  # rank r's stream, batch after batch
        return iter(streams.t().reshape(-1).tolist())  # interleaved: position t * R + r is rank r's t-th
