"""The backbone spec: which timm model to fine-tune and where its starting weights come from.

The spec is plain data (a YAML block), so the trainable model and the frozen reference are the same
model by construction, and a checkpoint can always be matched with the weights it started from.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

__all__ = ["BackboneError", "BackboneSpec", "build_backbone", "resolve_data_config"]

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class BackboneError(ValueError):
    """A backbone spec that cannot be built (unknown model, missing or unreadable weights)."""


@dataclass
class BackboneSpec:
    """A timm model and its starting weights.

    Attributes:
        name: timm model name with optional pretrained tag, e.g. `vit_base_patch16_224.orig_in21k_ft_in1k`
            (the weights the CFT release loads; timm's untagged default is a different model).
        pretrained: load pretrained weights (from the Hugging Face hub, or `checkpoint_path` when set).
            `false` gives random weights (tests, from-scratch runs).
        checkpoint_path: a local weight file in the hub's format (a timm/HF `state_dict` as `.pth`, `.bin` or
            `.safetensors`) used instead of downloading. The classifier is re-created when `num_classes`
            differs from the file's head.
        num_classes: size of the classifier head; `null` keeps the pretrained head (1000 for ImageNet models).
        model_kwargs: extra keyword arguments for `timm.create_model` (e.g. `img_size`, `drop_path_rate`).
    """

    name: str
    pretrained: bool = True
    checkpoint_path: str | None = None
    num_classes: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _check_name(name: str) -> None:
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.75)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BackboneError(f"model.backbone.name: timm has no model {name!r}.{hint}")


def build_backbone(spec: BackboneSpec) -> nn.Module:
    """Create the timm model described by `spec`, with its starting weights loaded."""
    _check_name(spec.name)
    kwargs: dict[str, Any] = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        if spec.num_classes < 1:
            raise BackboneError(f"model.backbone.num_classes must be positive, got {spec.num_classes}")
        kwargs["num_classes"] = spec.num_classes
    pretrained = spec.pretrained or spec.checkpoint_path is not None
    if spec.checkpoint_path is not None:
        path = os.path.expanduser(spec.checkpoint_path)
        if not os.path.isfile(path):
            raise BackboneError(f"model.backbone.checkpoint_path: no such file {path!r}")
        if not path.endswith(_WEIGHT_SUFFIXES):
            raise BackboneError(
                f"model.backbone.checkpoint_path: {path!r} is not a weight file ({', '.join(_WEIGHT_SUFFIXES)})"
            )
        kwargs["pretrained_cfg_overlay"] = dict(file=path)
    try:
        model = timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        if spec.checkpoint_path is not None:
            raise BackboneError(
                f"model.backbone.checkpoint_path: could not load {spec.checkpoint_path!r} into {spec.name}: {err}"
            ) from err
        if pretrained:
            raise BackboneError(
                f"could not fetch pretrained weights for {spec.name!r} ({type(err).__name__}: {err}). "
                "Offline? Set backbone.checkpoint_path to a local weight file, or backbone.pretrained: false."
            ) from err
        raise
    return model


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's evaluation data config of `model` (input size, interpolation, mean, std, crop).

    timm reads the input size from the pretrained config; a ViT built with another `img_size` (and no
    dynamic size) only accepts that size, so the model's own patch-embedding size wins.
    """
    config = dict(timm.data.resolve_data_config({}, model=model))
    embed = getattr(model, "patch_embed", None)
    img_size = getattr(embed, "img_size", None)
    if img_size is not None and not getattr(embed, "dynamic_img_size", False):
        config["input_size"] = (config["input_size"][0], *tuple(img_size))
    return config


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with every parameter frozen (the reference model)."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of `model`'s weights, in the format `checkpoint_path` reads back."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
