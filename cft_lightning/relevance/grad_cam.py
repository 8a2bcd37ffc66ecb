"""Grad-CAM (Selvaraju et al., ICCV 2017) for timm ViTs and CNNs, batched and differentiable.

    w_c = mean over the grid of d y_target / d A_c,      map = relu(sum_c w_c A_c)

A is the output of one layer: for a ViT the tokens entering the last block's attention
(`blocks.-1.norm1`, pytorch-grad-cam's recommended ViT layer), with the prefix tokens dropped and the patch
tokens placed on their grid; for a CNN a (B, C, h, w) feature map (default: the last stage). The release's
"gradcam" is a different method (a rollout; see docs/relevance.md); this is Grad-CAM proper. With
`differentiable=True` the gradient is taken with `create_graph=True`: the map's parameter gradient is
exact (second order).
"""

from __future__ import annotations

from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance._attention import patch_grid
from cft_lightning.relevance._layers import cnn_feature_layers, layer_activation_and_gradient, resolve_module
from cft_lightning.relevance.base import Normalization, RelevanceMethod

__all__ = ["GradCAM", "default_cam_layer"]


def default_cam_layer(model: nn.Module) -> str:
    """`blocks.-1.norm1` for ViTs; for CNNs the last feature stage: `stages.-1` (ConvNeXt and other staged timm
    CNNs), else the last module of timm's `feature_info` (`layer4` for ResNets)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return "blocks.-1.norm1"
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages):
        return "stages.-1"
    layers = cnn_feature_layers(model)
    if layers:
        return layers[-1]
    raise UnsupportedModelError(
        f"no default Grad-CAM layer for {type(model).__name__}: name one with GradCAM(layer='<module path>')"
    )


@register_relevance("gradcam")
class GradCAM(RelevanceMethod):
    """Gradient-weighted class activation map of one layer, on that layer's grid."""

    differentiability = "exact"
    architectures = ("timm ViTs (token layers)", "CNNs (feature-map layers)")
    explains_layer = True

    def __init__(self, layer: str | None = None, normalize: Normalization = "minmax", eps: float = 1e-8) -> None:
        """
        Args:
            layer: dotted path of the explained module (negative indices allowed, e.g. `blocks.-1.norm1`);
                None picks `default_cam_layer`.
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        super().__init__(normalize=normalize, eps=eps)
        self.layer = layer

    def check_model(self, model: nn.Module) -> None:
        resolve_module(model, self.layer or default_cam_layer(model))

    def layer_for(self, model: nn.Module) -> str:
        return self.layer or default_cam_layer(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        acts, grads, logits, targets = layer_activation_and_gradient(
            model, images, targets, self.layer or default_cam_layer(model), differentiable)
        with float32_region(acts):  # the channel sum of weights x activations, both signs: float32
            return self._cam(model, images, upcast(acts), upcast(grads)), logits, targets

    def _cam(self, model: nn.Module, images: Tensor, acts: Tensor, grads: Tensor) -> Tensor:
        if acts.dim() == 3:  # ViT tokens (B, N, D): patch tokens onto the grid, channels last
            prefix = getattr(model, "num_prefix_tokens", 1)
            acts, grads = acts[:, prefix:], grads[:, prefix:]
            h, w = patch_grid(model, images, acts.shape[1])
            weights = grads.mean(dim=1, keepdim=True)  # (B, 1, D)
            return (weights * acts).sum(dim=-1).clamp_min(0).reshape(-1, h, w)
        if acts.dim() == 4:  # CNN feature map (B, C, h, w)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            return (weights * acts).sum(dim=1).clamp_min(0)
        raise UnsupportedModelError(f"Grad-CAM layer output has shape {tuple(acts.shape)}; expected 3 or 4 dims")
