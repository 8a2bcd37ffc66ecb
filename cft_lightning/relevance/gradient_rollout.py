"""Gradient-weighted attention rollout (Chefer et al., CVPR 2021 "generic attention explainability"),
in the regime of RobustViT and of the CFT authors' release.

Per block l: A_bar_l = mean over heads of relu(dy/dA_l * A_l); rollout R_0 = I, R_l = R_{l-1} + A_bar_l R_{l-1};
relevance = the [CLS] row of R_L over the patch tokens (models without a class token: the mean row of
the patch tokens). The attention gradients dy/dA_l come from one `autograd.grad` call without
`create_graph`: they are held constant, so the map is differentiable only through the attention maps
themselves (`differentiability = "attention_only"`), which is what the release trains with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.relevance._attention import attention_drops, explicit_attention, patch_grid, prediction_row
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets


@register_relevance("rollout")
class GradientRollout(RelevanceMethod):
    """Chefer-style gradient-weighted rollout for timm ViTs, attention gradients held constant."""

    differentiability = "attention_only"
    architectures = ("timm VisionTransformer and other timm models whose attention has an `attn_drop`",)
    families = ("vit",)

    def __init__(self, normalize: Normalization = "minmax", eps: float = 1e-8) -> None:
        """
        Args:
            normalize: `minmax` (release) or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        super().__init__(normalize=normalize, eps=eps)

    def check_model(self, model: nn.Module) -> None:
        attention_drops(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        maps: list[Tensor] = []
        drops = attention_drops(model)
        # A frozen model (no parameter and no image requires grad) gives maps outside any graph: make them
        # leaves that require grad so dy/dA still exists (the same tensor object is used downstream).
        handles = [
            d.register_forward_hook(lambda _m, _i, out: maps.append(out if out.requires_grad else out.requires_grad_()))
            for d in drops
        ]
        try:
            with explicit_attention(model):
                logits = model(images)
        finally:
            for h in handles:
                h.remove()
        targets = resolve_targets(logits, targets)
        score = logits.gather(1, targets[:, None]).sum()
        grads = torch.autograd.grad(score, maps, retain_graph=torch.is_grad_enabled() and logits.requires_grad)
        # The rollout in float32: a product of L matrices whose rounding errors compound, and whose entries
        # grow with depth (R_l = (I + A_l) R_{l-1}) beyond float16's range in deep models.
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()), float32_region(maps[0]):
            B, _, N, _ = maps[0].shape
            rollout = torch.eye(N, dtype=upcast(maps[0]).dtype, device=maps[0].device).expand(B, N, N)
            for attn, grad in zip(maps, grads):
                weighted = (upcast(grad) * upcast(attn)).clamp_min(0).mean(dim=1)
                rollout = rollout + weighted @ rollout
            rows = prediction_row(rollout, model)
        grid = patch_grid(model, images, rows.shape[1])
        return rows.reshape(B, *grid), logits, targets
