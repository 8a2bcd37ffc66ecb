"""Shared fixtures of the regularizer tests: a tiny random float64 ViT, a batch with masks, and the
finite-difference check of a regularizer's total loss."""

from __future__ import annotations

import math

import timm
import torch
from _lxt_oracle import evaluate_at_offsets
from torch import Tensor, nn

LABELS = torch.tensor([1, 3])
GRID = (4, 4)  # 32x32 images, patch 8

def tiny_vit(seed: int = 0) -> nn.Module:
    """A 2-block, 3-head, 5-class float64 ViT in eval mode (no dropout), weights re-drawn far from timm's
    near-identity init so that attention is not uniform and the maps depend on every block."""
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=48,
        num_heads=3,
        num_classes=5,
    ).to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("pos_embed", "cls_token"):
                new = 0.5 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            elif p.ndim >= 2:
                new = torch.randn(p.shape, generator=gen, dtype=torch.float64) / math.sqrt(p[0].numel())
            elif name.endswith("weight"):
                new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                new = 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(new)
    return model.eval()


def tiny_batch(concept: Tensor | None = None, obj: Tensor | None = None) -> dict:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    if concept is None:
        # patch-unaligned rectangles: several grid cells are partly inside (soft cells)
        concept = torch.zeros(2, 32, 32)
        concept[0, :12, :20] = 1
        concept[1, 10:30, 5:9] = 1
    if obj is None:
        obj = torch.zeros(2, 32, 32)
        obj[:, 4:28, 4:28] = 1
    return {"image": images, "label": LABELS.clone(), "masks": {"concept": concept, "object": obj}, "path": ["a", "b"]}


def random_direction(model: nn.Module, seed: int = 7) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]


def grads_of(model: nn.Module, value: Tensor) -> dict[str, Tensor]:
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}


def directional(grads: dict[str, Tensor], model: nn.Module, direction: list[Tensor]) -> float:
    return sum(float((grads[n] * d).sum()) for (n, _), d in zip(model.named_parameters(), direction))


H = 1e-6  # float64: truncation error ~1e-9 relative here, rounding ~1e-10


def check_gradient_matches_fd(reg, relevance, batch, reference_logits=None, model=None) -> dict[str, Tensor]:
    """Backprop the total, then compare <grad, d> with the central difference of the total along d.

    The piecewise parts of the objective must not switch between theta - h d and theta + h d: the argmax of
    the logits (consistency target 'self', relevance target 'self') and the argmin / argmax cell of each raw
    map (the kinks of the min-max normalisation and of the [eps, 1 - eps] clamp). This is asserted.
    """
    model = tiny_vit() if model is None else model
    out = reg(batch, model, relevance, reference_logits)
    assert torch.isfinite(out.total)
    grads = grads_of(model, out.total)
    flat = torch.cat([g.flatten() for g in grads.values()])
    assert torch.isfinite(flat).all()
    assert flat.abs().max() > 1e-6

    d = random_direction(model)
    ad = directional(grads, model, d)
    plus, minus = evaluate_at_offsets(model, lambda: reg(batch, model, relevance, reference_logits), d, H)
    for o in (plus, minus):
        assert torch.equal(o.logits.argmax(1), out.logits.argmax(1))
        if out.relevance is not None:
            assert torch.equal(o.relevance.targets, out.relevance.targets)
            raw, raw0 = o.relevance.raw.flatten(1), out.relevance.raw.flatten(1)
            assert torch.equal(raw.argmax(1), raw0.argmax(1)) and torch.equal(raw.argmin(1), raw0.argmin(1))
    fd = (float(plus.total.detach()) - float(minus.total.detach())) / (2 * H)
    assert abs(fd) > 1e-3, fd  # the loss really changes along d
    assert abs(ad - fd) <= 1e-5 * abs(fd), (ad, fd)
    return grads
