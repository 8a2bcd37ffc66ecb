"""Gradient x activation on an intermediate feature map: CFT's relevance for CNNs, exactly differentiable.

The CFT paper adapts its relevance to CNNs by "replacing attention maps with intermediate feature
representations, following Barkan et al., combining activation magnitudes with LRP relevance". For the
linear layers of a network, LRP-0 relevance at a layer is its activation times the gradient reaching it,
so the map here is

    R = sum_c relu(A_c * d y_target / d A_c)          (A: the output of `layer`, on its own grid)

taken with `create_graph=True`, which makes its parameter gradient exact (second order). The positive part
follows IIA's CNN variant (Barkan et al.), which keeps the positive gradient-activation products. Without
the LRP rules for GELU and LayerNorm (identity rule), this is the gradient ("epsilon -> 0") variant; the
rule-exact backward exists for ViTs (`AttnLRP`).
"""

from __future__ import annotations

from torch import Tensor, nn

from cft_lightning._precision import float32_region, upcast
from cft_lightning._registry import register_relevance
from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance._attention import patch_grid
from cft_lightning.relevance._layers import cnn_feature_layers, layer_activation_and_gradient, resolve_module
from cft_lightning.relevance.base import Normalization, RelevanceMethod

__all__ = ["LayerGradXActivation", "default_feature_layer"]


def default_feature_layer(model: nn.Module) -> str:
    """`stages.-2` for staged CNNs (a 14 x 14 grid at 224 px for ConvNeXt, like ViT-B/16's), the input of a
    ViT's last block (`blocks.-1.norm1`), else the next-to-last module of timm's `feature_info` (`layer3`
    for ResNets)."""
    stages = getattr(model, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) >= 2:
        return "stages.-2"
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) and hasattr(blocks[-1], "norm1"):
        return "blocks.-1.norm1"
    layers = cnn_feature_layers(model)
    if len(layers) >= 2:
        return layers[-2]
    raise UnsupportedModelError(
        f"no default feature layer for {type(model).__name__}: name one with LayerGradXActivation(layer=...)"
    )


@register_relevance("grad_x_act")
class LayerGradXActivation(RelevanceMethod):
    """relu(activation x gradient) summed over channels at one layer, on that layer's grid."""

    differentiability = "exact"
    architectures = ("CNNs (feature maps, e.g. ConvNeXt-V2 stages)", "timm ViTs (token layers)")
    explains_layer = True

    def __init__(self, layer: str | None = None, positive: bool = True, normalize: Normalization = "minmax",
                 eps: float = 1e-8) -> None:
        """
        Args:
            layer: dotted module path (negative indices allowed); None picks `default_feature_layer`.
            positive: keep only positive products per channel (IIA's CNN variant); False gives the signed sum.
            normalize: `minmax` or `positive_max` (see `normalize_maps`).
            eps: normalisation stabiliser.
        """
        super().__init__(normalize=normalize, eps=eps)
        self.layer = layer
        self.positive = positive

    def check_model(self, model: nn.Module) -> None:
        resolve_module(model, self.layer or default_feature_layer(model))

    def layer_for(self, model: nn.Module) -> str:
        return self.layer or default_feature_layer(model)

    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        acts, grads, logits, targets = layer_activation_and_gradient(
            model, images, targets, self.layer or default_feature_layer(model), differentiable)
        with float32_region(acts):  # the channel sum (signed with positive=False): float32
            products = upcast(acts) * upcast(grads)
            if self.positive:
                products = products.clamp_min(0)
            if acts.dim() == 4:  # (B, C, h, w)
                return products.sum(dim=1), logits, targets
            if acts.dim() == 3:  # ViT tokens (B, N, D)
                prefix = getattr(model, "num_prefix_tokens", 1)
                tokens = products[:, prefix:].sum(dim=-1)
                return tokens.reshape(-1, *patch_grid(model, images, tokens.shape[1])), logits, targets
        raise UnsupportedModelError(f"feature layer output has shape {tuple(acts.shape)}; expected 3 or 4 dims")
