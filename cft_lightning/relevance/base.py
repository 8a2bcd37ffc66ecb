"""The `RelevanceMethod` contract: what every relevance (explanation) method returns and promises.

A relevance method explains a model's class score on the model's own token/feature grid. It runs the
model's forward pass itself, so the logits it returns are those of the same pass: a training step needs
one forward for both the relevance loss and the classification loss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from cft_lightning._plugins import RecordsInitArgs
from cft_lightning._precision import ALL_PRECISIONS, PrecisionKind, float32_region, upcast

Differentiability = Literal["exact", "attention_only", "none"]
Normalization = Literal["minmax", "positive_max"]
ModelFamily = Literal["vit", "cnn"]


@dataclass
class Relevance:
    """The result of explaining a batch.

    Attributes:
        maps: (B, h, w) relevance normalised per image into [0, 1] on the patch (or feature) grid.
        raw: (B, h, w) the signed, unnormalised relevance the maps were made from.
        logits: (B, C) logits of the forward pass that produced the maps.
        targets: (B,) the class each map explains.
    """

    maps: Tensor
    raw: Tensor
    logits: Tensor
    targets: Tensor


def normalize_maps(raw: Tensor, mode: Normalization = "minmax", eps: float = 1e-8) -> Tensor:
    """Map signed (B, h, w) relevance into [0, 1] per image (float32 or float64), differentiably and without NaN
    for constant maps.

    `minmax`: (r - min) / (max - min + eps), as the CFT release does (plus the eps it lacks).
    `positive_max`: relu(r) / (max relu(r) + eps): negative evidence counts as none.
    """
    if mode not in ("minmax", "positive_max"):
        raise ValueError(f"unknown relevance normalisation {mode!r}; expected 'minmax' or 'positive_max'")
    # Maps are float32 whatever the autocast type: eps (1e-8) is 0 in float16, and in bfloat16 the map's
    # largest cells round to exactly 1, where CFT's log(1 - Phi) is -inf.
    with float32_region(raw):
        flat = upcast(raw).flatten(1)
        if mode == "minmax":
            lo = flat.amin(dim=1, keepdim=True)
            hi = flat.amax(dim=1, keepdim=True)
            out = (flat - lo) / (hi - lo + eps)
        else:
            pos = flat.clamp_min(0)
            out = pos / (pos.amax(dim=1, keepdim=True) + eps)
    return out.view(raw.shape)


def resolve_targets(logits: Tensor, targets: Tensor | None) -> Tensor:
    """The classes to explain: the given ones, or the argmax of this forward pass when None."""
    if targets is None:
        return logits.detach().argmax(dim=1)
    targets = torch.as_tensor(targets, device=logits.device).long().view(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"got {targets.numel()} targets for a batch of {logits.shape[0]} images")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]):
        raise ValueError(
            f"target classes must lie in [0, {logits.shape[1] - 1}] for this model's head; "
            f"got min {int(targets.min())}, max {int(targets.max())}"
        )
    return targets


class RelevanceMethod(RecordsInitArgs, ABC):
    """Explains `model(images)` for `targets` on the model's grid. Subclass and implement `explain`.

    Class attributes describe the method (captum-style flags):
        differentiability: how the map depends on the parameters when `differentiable=True`:
            `exact` the map's parameter gradient is the true one (second order through the rules),
            `attention_only` gradients of the attention maps are held constant (RobustViT / CFT release),
            `none` the map is detached.
        architectures: model families the method supports (for error messages and docs).
        families: the families it explains, `vit` (timm VisionTransformer) and/or `cnn` (convolutional feature
            maps, e.g. ResNet, ConvNeXt); `check_model` refuses a model of a family not listed. The contract
            tests run the method on each listed family and check the refusal on the others.
        explains_layer: it explains one module, named by its `layer` argument (None: `layer_for(model)`);
            `cft explain --layer` applies to such methods.
        precisions: the `trainer.precision` kinds it supports (`"32"`, `"bf16"`, `"16"`: 32-true, bf16-mixed,
            16-mixed); the fine-tuner refuses any other at start-up (docs/relevance.md, Mixed precision).

    Register a method under a name with `@register_relevance("name")` (`cft_lightning.relevance`): `cft explain`,
    `cft critique`, `cft demo` and the contract tests then know it (docs/extending.md).
    """

    differentiability: ClassVar[Differentiability] = "none"
    architectures: ClassVar[tuple[str, ...]] = ()
    families: ClassVar[tuple[ModelFamily, ...]] = ("vit", "cnn")
    explains_layer: ClassVar[bool] = False
    precisions: ClassVar[tuple[PrecisionKind, ...]] = ALL_PRECISIONS

    def __init__(self, normalize: Normalization = "minmax", eps: float = 1e-8) -> None:
        """
        Args:
            normalize: how signed relevance becomes the [0, 1] map: `minmax` per image (release) or
                `positive_max` (negative relevance clipped to 0, then divided by the max).
            eps: stabiliser of the normalisation.
        """
        self.normalize = normalize
        self.eps = eps

    def __call__(
        self,
        model: nn.Module,
        images: Tensor,
        targets: Tensor | None = None,
        *,
        differentiable: bool = True,
    ) -> Relevance:
        """Explain `targets` (None: the predicted class of this pass).

        With `differentiable=True` the maps stay in the autograd graph (in the regime of
        `differentiability`) so a loss on them trains the model; with False they are detached and
        cheaper to compute.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs autograd, but it was called under torch.inference_mode(). "
                "Lightning evaluates under inference mode by default: set `trainer.inference_mode: false` "
                "(or pass --trainer.inference_mode false) for validate/test/predict with relevance."
            )
        with torch.enable_grad():
            raw, logits, targets = self.explain(model, images, targets, differentiable=differentiable)
        if not differentiable or self.differentiability == "none":
            raw = raw.detach()
        maps = normalize_maps(raw, self.normalize, self.eps)
        return Relevance(maps=maps, raw=raw, logits=logits, targets=targets)

    def check_model(self, model: nn.Module) -> None:
        """Raise `UnsupportedModelError` if this method cannot explain `model` (called once, before training).

        The default accepts every model; methods tied to an architecture override it.
        """
        return None

    def layer_for(self, model: nn.Module) -> str | None:
        """The module this method explains in `model` (a dotted path) when it `explains_layer`, else None."""
        return None

    @abstractmethod
    def explain(
        self, model: nn.Module, images: Tensor, targets: Tensor | None, *, differentiable: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Return (raw signed relevance (B, h, w), logits (B, C), explained targets (B,))."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
