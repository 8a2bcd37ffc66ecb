"""Background-swap donors: for every test image, another image of the same split (docs/results.md).

The donor is fixed per sample in the Dataset, from the labels and a fixed seed, so `cft test`'s background-swap
numbers do not depend on batch size, shuffling or the number of DDP ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["DONOR_SEED", "choose_donors", "foreground_kind"]

DONOR_SEED = 0  # fixed, so every run's background swap pairs the same images


def foreground_kind(kinds: Iterable[str]) -> str | None:
    """The mask kind that marks an image's foreground for the background swap: `object`, else `concept`."""
    kinds = set(kinds)
    return next((k for k in ("object", "concept") if k in kinds), None)


def choose_donors(labels: Sequence[int], seed: int = DONOR_SEED) -> np.ndarray:
    """For every sample, the index of another sample whose label differs, uniformly at random.

    One ``numpy.random.default_rng(seed)`` draw per sample, vectorised: sample i draws u_i uniform over the
    samples of other labels, in the order of a stable sort by label. If every sample has the same label, the
    donor is uniform over the other samples (and a one-sample split is its own donor). The result depends only
    on the label sequence and the seed.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(y)
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    values, counts = np.unique(y, return_counts=True)
    if len(values) == 1:  # one label only: any other image
        u = rng.integers(0, n - 1, size=n)
        return np.where(u < np.arange(n), u, u + 1).astype(np.int64)
    order = np.argsort(y, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    group = np.searchsorted(values, y)
    start, count = starts[group], counts[group]
    u = rng.integers(0, n - count)  # uniform over the n - count samples of other labels
    return order[np.where(u < start, u, u + count)].astype(np.int64)
