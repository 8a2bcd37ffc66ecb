"""The backbone spec: which timm model to fine-tune and where its starting weights come from.

The spec is plain data (a YAML block), so the trainable model and the frozen reference are the same
model by construction, and a checkpoint can always be matched with the weights it started from.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from cft_lightning.errors import BackboneError

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "build_backbone",
    "load_weight_file",
    "offline_message",
    "read_state_dict",
    "resolve_data_config",
]

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass
class BackboneSpec:
    """A timm model and its starting weights.

    Attributes:
        name: timm model name with optional pretrained tag, e.g. `vit_base_patch16_224.orig_in21k_ft_in1k`
            (the weights the CFT release loads; timm's untagged default is a different model).
        pretrained: load pretrained weights (from the Hugging Face hub, or `checkpoint_path` when set).
            `false` gives random weights (tests, from-scratch runs).
        checkpoint_path: a local weight file used instead of downloading: a timm `state_dict` (`.pth`, `.pt`,
            `.bin`, `.safetensors`) or a `cft fit` checkpoint (`.ckpt`). Loaded strictly, except that a
            classifier of another size than `num_classes` is left freshly initialised.
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


def build_backbone(spec: BackboneSpec, weights_flag: str = "model.backbone.checkpoint_path") -> nn.Module:
    """Create the timm model described by `spec`, with its starting weights loaded. `weights_flag` is the
    option that gives a local weight file in the calling command (named when the hub cannot be reached)."""
    _check_name(spec.name)
    kwargs: dict[str, Any] = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        if spec.num_classes < 1:
            raise BackboneError(f"model.backbone.num_classes must be positive, got {spec.num_classes}")
        kwargs["num_classes"] = spec.num_classes
    if spec.checkpoint_path is not None:
        path = _check_weight_file(spec.checkpoint_path)
        model = _create(spec, kwargs, pretrained=False)
        load_weight_file(model, path)
        return model
    try:
        return _create(spec, kwargs, pretrained=spec.pretrained)
    except BackboneError:
        raise
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        if not spec.pretrained:
            raise
        raise BackboneError(offline_message(spec.name, err, weights_flag)) from err


def offline_message(name: str, err: BaseException, weights_flag: str) -> str:
    """What to do when the hub's weights for `name` cannot be fetched: pre-download them where the hub is
    reachable, or give the command a local file; `HF_HUB_OFFLINE=1` makes the failure immediate."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return (f"could not fetch pretrained weights for {name!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{first[:300]}). Offline? Either pre-download them on a machine with internet (`python -c \"import "
            f"timm; timm.create_model('{name}', pretrained=True)\"` fills ~/.cache/huggingface/hub, which can be "
            f"copied here; set HF_HOME if it lives elsewhere), or pass a local weight file with {weights_flag}. "
            "With HF_HUB_OFFLINE=1 this fails at once instead of after the hub's retries.")


def _create(spec: BackboneSpec, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    """`timm.create_model`, with a keyword argument the model does not take named in one line."""
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None or match.group(1) not in spec.model_kwargs:
            raise
        key = match.group(1)
        hint = ""
        if key in ("img_size", "input_size"):
            hint = ("; this model takes images of any size: set the size images are resized to with "
                    "data.data_config (input_size: [3, H, W] and the model's mean and std)")
        raise BackboneError(
            f"model.backbone.model_kwargs: timm model {spec.name!r} does not take {key!r}{hint}"
        ) from err


def _check_weight_file(checkpoint_path: str) -> str:
    path = os.path.expanduser(checkpoint_path)
    if not os.path.isfile(path):
        raise BackboneError(f"model.backbone.checkpoint_path: no such file {path!r}")
    if not path.endswith(_WEIGHT_SUFFIXES):
        raise BackboneError(
            f"model.backbone.checkpoint_path: {path!r} is not a weight file ({', '.join(_WEIGHT_SUFFIXES)})"
        )
    return path


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: a plain or wrapped (`state_dict`/`model`) torch file, safetensors, or a
    `cft fit` checkpoint (whose `backbone.` prefix is removed)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, pickled objects: all the user can act on is the file
        raise BackboneError(f"model.backbone.checkpoint_path: cannot read {path!r}: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise BackboneError(f"model.backbone.checkpoint_path: {path!r} holds no state_dict of tensors")
    for prefix in ("backbone.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weight_file(model: nn.Module, path: str) -> None:
    """Load a local weight file into `model` strictly, except for a classifier of another size, which is
    kept as created (e.g. a 1000-class file into a 10-class model).

    timm's own `pretrained_cfg_overlay=dict(file=...)` route compares `num_classes` with the *pretrained
    config* (0 for DINOv2) rather than with the file, so it can drop a file's valid head and then load the
    rest non-strictly; this loader compares with the file. The model family's `checkpoint_filter_fn`
    (position-embedding resampling, key conversion) is applied when timm has one.
    """
    state = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise BackboneError(
                f"model.backbone.checkpoint_path: {path!r} does not fit {type(model).__name__}: {err}"
            ) from err
    own = model.state_dict()
    classifiers = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    head_keys = {k for k in own if any(k == c or k.startswith(f"{c}.") for c in classifiers)}
    kept_head = set()
    for key in head_keys:
        if key in state and state[key].shape != own[key].shape:
            del state[key]
            kept_head.add(key)
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state and k not in kept_head]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = [f"{name} {keys[:4]}{' ...' if len(keys) > 4 else ''}" for name, keys in
                 (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected)) if keys]
        raise BackboneError(
            f"model.backbone.checkpoint_path: {path!r} does not fit {type(model).__name__} "
            f"({model.pretrained_cfg.get('architecture', '')}): " + "; ".join(parts)
        )
    model.load_state_dict(state, strict=False)


def resolve_data_config(model: nn.Module) -> dict[str, Any]:
    """timm's evaluation data config of `model` (input size, interpolation, mean, std, crop).

    timm reads the input size from the pretrained config; a ViT built with another `img_size` (and no
    dynamic size) only accepts that size, so the model's own patch-embedding size wins.
    """
    config = dict(timm.data.resolve_data_config({}, model=model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None and not getattr(model, "dynamic_img_size", False):
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
