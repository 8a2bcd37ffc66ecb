"""LVLM-VA's alignment score: mu_align = 1 - mean_n (sum_i A_ni |Phi_ni| / sum_i |Phi_ni|), the share of the
absolute attribution that lies outside the ground-truth spurious region A (1 = none on the shortcut)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cft_lightning.critique.attribution import Attributor

__all__ = ["mu_align", "spurious_share"]


def spurious_share(attribution: Tensor, spurious: Tensor, eps: float = 1e-12) -> Tensor:
    """(B,) share of |attribution| inside the (B, H, W) spurious masks (0 for an all-zero attribution)."""
    mass = attribution.abs().flatten(1)
    return (mass * spurious.flatten(1).to(mass.dtype)).sum(1) / mass.sum(1).clamp_min(eps)


def mu_align(model: nn.Module, loader: torch.utils.data.DataLoader, attributor: Attributor) -> float:
    """mu_align of `model` over the batches of `loader` (dicts with `image`, `label` and `truth`, the spurious
    mask on the model's view, as `critique.stage.ImageItems` yields); attributions explain the label."""
    model.eval()
    shares = []
    for batch in loader:
        attribution = attributor(model, batch["image"], batch["label"])
        shares.append(spurious_share(attribution, batch["truth"]))
    return float(1.0 - torch.cat(shares).mean())
