"""Low-entropy sampling (LVLM-VA): the alignment set is the N training images the model is most sure of.

Shortcuts are learnt early and confidently, so the lowest predictive entropies concentrate the images
that rely on them (LVLM-VA's knee X-rays: 56 % spurious in the low-entropy set vs 25 % at random). The
selection needs no labels. Ties are broken by the image key, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["entropies_by_key", "lowest_entropy", "predictive_entropy"]


def predictive_entropy(logits: Tensor) -> Tensor:
    """(B,) entropy in nats of softmax(logits), computed in float64 from log-probabilities (no 0 * log 0)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def lowest_entropy(entropy: dict[str, float], n: int) -> list[str]:
    """The keys of the `n` lowest entropies (ties: by key), lowest first."""
    if n < 1:
        raise ValueError(f"the alignment set needs n >= 1 samples, got {n}")
    return [key for key, _ in sorted(entropy.items(), key=lambda kv: (kv[1], kv[0]))[:n]]


def entropies_by_key(keys: Sequence[str], logits: Tensor) -> dict[str, float]:
    """{key: entropy} for one batch."""
    return dict(zip(keys, predictive_entropy(logits).tolist()))
