"""IIA, Iterated Integrated Attributions (Barkan, Elisha, Asher, Eshel, Koenigstein, ICCV 2023), for timm ViTs.

For alpha, beta in linspace(0, 1, n + 1) (n = `steps`; the CFT paper uses 10, the IIA repository 5):
run the model on alpha * x (baseline 0 in normalised space) with the last block's attention replaced by
beta * A_L, and take for every block l the positive part of gradient x attention, C_l = relu(dy/dA~_l * A~_l).
Their mean over all (alpha, beta) and heads is rolled out:

    A_bar_l = mean_{alpha, beta, heads} C_l,   A_hat_l = (A_bar_l + I) / rowsum,   R = A_hat_L ... A_hat_1

and the map is R's [CLS] row over the patch tokens. This is what the IIA repository and the CFT release
compute for one image at a time; here a whole batch goes through each of the (n + 1)^2 passes (a pass
with beta = 1 is the alpha pass of the original, so the separate alpha pass is not needed). When no target
is given, the class explained is the prediction on the image itself (the IIA repository takes the
prediction on the baseline image; the release re-takes it at every step). The map is detached
(`differentiability = "none"`), as in the release.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.relevance._attention import attention_drops, explicit_attention, patch_grid, prediction_row
from cft_lightning.relevance.base import Normalization, RelevanceMethod, resolve_targets

__all__ = ["IIA", "normalized_rollout"]


def normalized_rollout(attn: list[Tensor]) -> Tensor:
    """Attention rollout with row normalisation (Abnar & Zuidema): prod_l (A_l + I) / rowsum, first block first.

    `attn`: per block a (B, N, N) head-averaged map. Returns the (B, N, N) product A_hat_L ... A_hat_1.
    """
    B, N, _ = attn[0].shape
    with float32_region(attn[0]):  # a product of L row-normalised matrices: rounding compounds, so float32
        eye = torch.eye(N, dtype=upcast(attn[0]).dtype, device=attn[0].device)
        joint = eye.expand(B, N, N)
        for a in attn:
            a = upcast(a) + eye
            joint = (a / a.sum(dim=-1, keepdim=True)) @ joint
    return joint


def _scaled_pass(
    model: nn.Module, drops: list[nn.Module], x: Tensor, targets: Tensor, beta: float
) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """One pass on `x` with the last block's attention scaled by `beta`: (attention maps as used, d y / d maps)."""
    maps: list[Tensor] = []
    last = drops[-1]

    def record(module: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        out = out * beta if module is last else out
        if not out.requires_grad:  # a frozen model: make the map a leaf so that d y / d map exists
            out = out.detach().requires_grad_()
        maps.append(out)
        return out

    handles = [d.register_forward_hook(record) for d in drops]
    try:
        with torch.enable_grad():
            logits = model(x)
            grads = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), maps)
    finally:
        for h in handles:
            h.remove()
    return maps, grads


@register_relevance("iia")
class IIA(RelevanceMethod):
    """Iterated Integrated Attributions over the image and the last block's attention, batched."""

    differentiability = "none"
    architectures = ("timm VisionTransformer and other timm models whose attention has an `attn_drop`",)
    families = ("vit",)

    def __init__(self, steps: int = 10, normalize: Normalization = "minmax", eps: float = 1e-8) -> None:
        """
        Args:
            steps: n, intervals of each integral ((n + 1)^2 forward and backward passes per batch).
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        if steps < 1:
            raise ValueError(f"IIA needs steps >= 1, got {steps}")
        super().__init__(normalize=normalize, eps=eps)
        self.steps = steps

    def check_model(self, model: nn.Module) -> None:
        attention_drops(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        drops = attention_drops(model)
        grid = torch.linspace(0.0, 1.0, self.steps + 1).tolist()
        with explicit_attention(model):
            logits = model(images)  # the real image: the logits returned, and the default targets
            targets = resolve_targets(logits, targets)
            total: list[Tensor] | None = None
            for alpha in grid:
                x = (images * alpha).detach()
                for beta in grid:
                    maps, grads = _scaled_pass(model, drops, x, targets, beta)
                    with torch.no_grad():  # float32 sums over the (n + 1)^2 passes (upcast: cheap, (B, N, N))
                        step = [(upcast(g) * upcast(a)).clamp_min(0).mean(dim=1) for g, a in zip(grads, maps)]
                        total = step if total is None else [t + s for t, s in zip(total, step)]
        assert total is not None
        with torch.no_grad():
            joint = normalized_rollout([t / len(grid) ** 2 for t in total])
            rows = prediction_row(joint, model)
        B = images.shape[0]
        return rows.reshape(B, *patch_grid(model, images, rows.shape[1])), logits, targets
