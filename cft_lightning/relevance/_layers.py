"""Infrastructure for layer-based relevance methods (Grad-CAM, gradient x activation): resolving a module by
its dotted path, and one forward pass that returns a layer's output with the target's gradient on it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cft_lightning.errors import UnsupportedModelError
from cft_lightning.relevance._attention import explicit_attention
from cft_lightning.relevance.base import resolve_targets

__all__ = ["cnn_feature_layers", "layer_activation_and_gradient", "resolve_module"]


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path; integer parts index containers (negative allowed: `blocks.-1.norm1`)."""
    module = model
    for part in path.split("."):
        try:
            module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
        except (AttributeError, IndexError, TypeError) as exc:
            raise UnsupportedModelError(f"{type(model).__name__} has no module {path!r} (at {part!r})") from exc
    return module


def cnn_feature_layers(model: nn.Module) -> list[str]:
    """Dotted paths of a CNN's feature stages, shallow to deep, from timm's `feature_info` (ResNet: `act1`,
    `layer1` ... `layer4`); empty for a model without one. For models without a `stages` container."""
    info = getattr(model, "feature_info", None)
    modules = [entry.get("module") for entry in info if isinstance(entry, dict)] if isinstance(info, list) else []
    return [m for m in modules if isinstance(m, str) and m]


def layer_activation_and_gradient(
    model: nn.Module, images: Tensor, targets: Tensor | None, path: str, differentiable: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward pass: (the output A of `path`, d y_target / dA, logits, targets). With `differentiable`
    the gradient keeps its graph (`create_graph`), so maps built from it have exact parameter gradients."""
    module = resolve_module(model, path)
    outputs: list[Tensor] = []

    def record(_module: nn.Module, _inputs: tuple, out: Tensor) -> Tensor:
        # A frozen model (the reference: no parameter and no image requires grad) gives an output outside any
        # graph: make it a leaf that requires grad, and let the rest of the pass run from it, so dy/dA exists.
        if isinstance(out, Tensor) and not out.requires_grad:
            out = out.detach().requires_grad_()
        outputs.append(out)
        return out

    handle = module.register_forward_hook(record)
    try:
        with explicit_attention(model):
            logits = model(images)
    finally:
        handle.remove()
    if len(outputs) != 1:
        raise UnsupportedModelError(f"layer {path!r} ran {len(outputs)} times in one forward pass (expected 1)")
    acts = outputs[0]
    targets = resolve_targets(logits, targets)
    score = logits.gather(1, targets[:, None]).sum()
    (grads,) = torch.autograd.grad(score, acts, create_graph=differentiable and torch.is_grad_enabled(),
                                   retain_graph=True)
    return acts, grads, logits, targets
