"""Pixel attributions for the critique: DeepLIFT-SHAP (captum) for CNNs and MLPs, our relevance methods for ViTs.

Every attributor maps (model, images (B, 3, H, W), targets (B,)) to a signed (B, H, W) attribution on the
pixels of the model's input; PPEPS-WGM then segments its positive part.

`DeepLiftShap` (LVLM-VA's choice): DeepLIFT's rescale rule averaged over a set of baselines (captum's
`DeepLiftShap`, summed over the colour channels). Its limits, from captum: the rules exist only for module
non-linearities (ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus, MaxPool, Softmax); GELU, SiLU and functional
ops fall back to plain gradients, which is why ViTs (GELU, softmax attention, LayerNorm) use a relevance
method of ours instead. A module object used twice in one forward (torchvision ResNet's shared `relu`)
breaks captum's hooks; timm's ResNets use one module per activation and work. The baselines are
`baselines` images, (K, 3, H, W) with K >= 2 (captum's requirement), e.g. a few training images (SHAP's
background set) or black images; LVLM-VA does not publish its choice, our default is K = 8 random
training images (see `cft critique --shap_baselines`).

`RelevanceAttribution` wraps any `RelevanceMethod`: its signed raw map, bilinearly upsampled from the patch
grid to the pixels (pixel-level methods such as `InputXGradient` pass through unchanged). Any registered relevance
method (`cft_lightning.relevance.list_relevance()`, plugins included) or a class path `pkg.module.Class` names
one; `input_grad` keeps its signed channel sum here (`channels="sum"`), since PPEPS-WGM segments the positive part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from cft_lightning._registry import SHIPPED_RELEVANCE

if TYPE_CHECKING:  # torch is imported where an attribution runs, so `cft critique --help` stays light
    from torch import Tensor, nn

    from cft_lightning.relevance.base import RelevanceMethod

__all__ = ["ATTRIBUTIONS", "Attributor", "DeepLiftShapAttribution", "RelevanceAttribution", "build_attributor",
           "is_vit"]

# `cft critique --attribution`: `auto` picks DeepLIFT-SHAP for CNNs and MLPs, input x gradient for ViTs; then
# every shipped relevance method (for help texts: plugins' names and class paths are accepted too)
ATTRIBUTIONS = ("auto", "deeplift_shap", *SHIPPED_RELEVANCE)
# arguments the critique gives a registered relevance method: a signed map (the positive part is segmented)
_ATTRIBUTION_ARGS: dict[str, dict[str, Any]] = {"input_grad": {"channels": "sum"}}


class Attributor(Protocol):
    name: str

    def __call__(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """(B, H, W) signed pixel attribution of `targets`."""


class DeepLiftShapAttribution:
    """captum's DeepLIFT-SHAP, summed over channels."""

    name = "deeplift_shap"

    def __init__(self, baselines: Tensor) -> None:
        if baselines.dim() != 4 or baselines.shape[0] < 2:
            raise ValueError(f"DeepLIFT-SHAP needs (K >= 2, 3, H, W) baselines, got shape {tuple(baselines.shape)}")
        self.baselines = baselines

    def __call__(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        import torch
        from captum.attr import DeepLiftShap

        baselines = self.baselines.to(images.device, images.dtype)
        if baselines.shape[1:] != images.shape[1:]:
            raise ValueError(f"DeepLIFT-SHAP baselines have shape {tuple(baselines.shape[1:])}, "
                             f"the images {tuple(images.shape[1:])}")
        try:
            with torch.enable_grad():
                attr = DeepLiftShap(model).attribute(images.detach().clone().requires_grad_(True), baselines,
                                                     target=targets)
        except (RuntimeError, AssertionError) as exc:
            raise RuntimeError(
                f"DeepLIFT-SHAP (captum) could not explain {type(model).__name__}: {exc}. Models that reuse one "
                "activation module, or without module non-linearities, need another attribution "
                "(cft critique --attribution ixg)") from exc
        return attr.detach().sum(dim=1)


class RelevanceAttribution:
    """A relevance method's signed raw map on the pixels of the input."""

    def __init__(self, method: RelevanceMethod, name: str) -> None:
        self.method, self.name = method, name

    def __call__(self, model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        import torch.nn.functional as F

        raw = self.method(model, images, targets, differentiable=False).raw.detach()
        if raw.shape[-2:] != images.shape[-2:]:
            raw = F.interpolate(raw[:, None].float(), size=images.shape[-2:], mode="bilinear",
                                align_corners=False)[:, 0]
        return raw


def is_vit(model: nn.Module) -> bool:
    """Whether `model` has attention modules (a timm ViT): `auto` then explains it with input x gradient."""
    return any(type(m).__name__ == "Attention" for m in model.modules())


def build_attributor(name: str, model: nn.Module, baselines: Tensor | None = None) -> Attributor:
    """The attributor called `name`: `auto` (DeepLIFT-SHAP unless the model is a ViT, then `ixg`),
    `deeplift_shap`, or a relevance method's registered name or class path. DeepLIFT-SHAP needs `baselines`
    (K >= 2 images); a relevance method is checked against `model` here."""
    from cft_lightning.relevance import create_relevance

    if name == "auto":
        name = "ixg" if is_vit(model) else "deeplift_shap"
    if name == "deeplift_shap":
        if baselines is None:
            raise ValueError("deeplift_shap needs baseline images")
        return DeepLiftShapAttribution(baselines)
    method = create_relevance(name, **_ATTRIBUTION_ARGS.get(name, {}))
    method.check_model(model)
    return RelevanceAttribution(method, name)
