"""Joint image + mask transforms.

Images and masks go through the same torchvision ``transforms.v2`` pipeline as ``tv_tensors.Image`` and
``tv_tensors.Mask``, so random crops and flips hit both identically. Masks are always resized with nearest
interpolation (torchvision's rule for ``Mask``) and are never converted to float before the geometry is done, so
they stay exactly binary (unlike the CFT release, which bilinearly resized soft masks).

Normalisation and geometry come from timm's resolved data config of the model (``input_size``, ``mean``, ``std``,
``interpolation``, ``crop_pct``), never from hard-coded constants. Random augmentation draws from torch's global
RNG, so Lightning's ``seed_everything(..., workers=True)`` makes it reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from cft_lightning.errors import DataError

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "lanczos": v2.InterpolationMode.LANCZOS,
    "box": v2.InterpolationMode.BOX,
    "hamming": v2.InterpolationMode.HAMMING,
}


@dataclass(frozen=True)
class DataConfig:
    """The parts of timm's data config that the transforms use."""

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> tuple[int, int]:
        """Size before cropping, ``floor(input_size / crop_pct)`` per side (timm's eval rule)."""
        return tuple(math.floor(s / self.crop_pct) for s in self.input_size)  # type: ignore[return-value]


@dataclass(frozen=True)
class Augmentation:
    """The random part of the training transform (evaluation never augments; the default is the CFT release's).

    Args:
        crop: ``random``: a random ``input_size`` crop of the resized image; ``center``: the evaluation's centre
            crop (no random geometry).
        hflip: Probability of a horizontal flip of image and masks; ``0`` turns flipping off (digits, text,
            any class whose mirror image is another class or no class).
    """

    crop: Literal["random", "center"] = "random"
    hflip: float = 0.5

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center"):
            raise DataError(f"data.augmentation.crop must be 'random' or 'center', got {self.crop!r}")
        if not 0.0 <= float(self.hflip) <= 1.0:
            raise DataError(f"data.augmentation.hflip is a probability in [0, 1], got {self.hflip!r}")

    @classmethod
    def parse(cls, value: Augmentation | Mapping[str, Any] | None) -> Augmentation:
        """An Augmentation from itself, a mapping of its fields (missing ones take the defaults) or None."""
        if value is None or isinstance(value, Augmentation):
            return value or cls()
        if not isinstance(value, Mapping):
            raise DataError(f"data.augmentation must be a mapping like {{crop: random, hflip: 0.5}}, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"data.augmentation: unknown key(s) {unknown}; known: crop, hflip")
        return cls(**value)


def parse_data_config(config: Mapping[str, Any] | DataConfig) -> DataConfig:
    """Validate a ``timm.data.resolve_data_config``-style dict.

    Required: ``input_size`` ((C, H, W) or (H, W) or an int), ``mean`` and ``std`` (3 values). Optional:
    ``interpolation`` (default ``"bilinear"``; timm's ``"random"`` falls back to bilinear) and ``crop_pct``
    (default timm's 0.875). Other keys (e.g. ``crop_mode``) are ignored.
    """
    if isinstance(config, DataConfig):
        return config
    if not isinstance(config, Mapping):
        raise DataError(f"data_config must be a dict like timm's resolve_data_config output, got {config!r}")
    missing = [k for k in ("input_size", "mean", "std") if k not in config]
    if missing:
        raise DataError(f"data_config is missing key(s) {missing}; pass timm's resolved data config of the model")
    size = config["input_size"]
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(size) == 3:
        size = size[1:]
    if len(size) != 2 or min(size) <= 0:
        raise DataError(f"data_config['input_size'] must be (C, H, W) or (H, W), got {config['input_size']!r}")
    mean, std = tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"data_config mean/std must be 3 values (std > 0), got mean={mean} std={std}")
    interpolation = str(config.get("interpolation") or "bilinear").lower()
    if interpolation == "random":
        interpolation = "bilinear"
    if interpolation not in _INTERPOLATIONS:
        raise DataError(f"data_config['interpolation'] {interpolation!r} not in {sorted(_INTERPOLATIONS)}")
    crop_pct = float(config.get("crop_pct") or 0.875)
    if not 0.0 < crop_pct <= 1.0:
        raise DataError(f"data_config['crop_pct'] must be in (0, 1], got {crop_pct}")
    return DataConfig(size, mean, std, interpolation, crop_pct)  # type: ignore[arg-type]


class JointTransform:
    """Transform a PIL image and its masks together.

    Train: Resize (shorter side to ``floor(input_size / crop_pct)``; both sides for a non-square input) ->
    RandomCrop(input_size) -> RandomHorizontalFlip(0.5) -> ToDtype(float32, scale) -> Normalize(mean, std), with
    the crop and flip set by ``augmentation`` (default: as listed). Eval: the same with CenterCrop and no flip.

    Call: ``image, masks = transform(pil_rgb_image, {kind: bool array (H, W)})`` returns a float tensor (3, h, w)
    and ``{kind: float32 tensor (h, w)}`` with values exactly 0 or 1.
    """

    def __init__(self, data_config: Mapping[str, Any] | DataConfig, train: bool,
                 augmentation: Augmentation | Mapping[str, Any] | None = None) -> None:
        self.config = parse_data_config(data_config)
        self.train = train
        self.augmentation = Augmentation.parse(augmentation) if train else None
        cfg = self.config
        height, width = cfg.input_size
        resize_h, resize_w = cfg.resize_size
        resize_to: int | list[int] = resize_h if height == width else [resize_h, resize_w]
        interpolation = _INTERPOLATIONS[cfg.interpolation]
        steps: list[Any] = [v2.Resize(resize_to, interpolation=interpolation, antialias=True)]
        aug = self.augmentation
        crop = v2.RandomCrop if aug is not None and aug.crop == "random" else v2.CenterCrop
        steps.append(crop((height, width)))
        if aug is not None and aug.hflip > 0:
            steps.append(v2.RandomHorizontalFlip(p=float(aug.hflip)))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
        self.pipeline = v2.Compose(steps)

    def __repr__(self) -> str:
        aug = f", {self.augmentation}" if self.augmentation is not None else ""
        return f"JointTransform(train={self.train}, {self.config}{aug})"

    def __call__(
        self, image: Image.Image, masks: Mapping[str, np.ndarray] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        masks = dict(masks or {})
        array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
        img = tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))
        kinds = list(masks)
        height, width = array.shape[:2]
        if kinds:
            stacked = np.stack([np.asarray(masks[k], dtype=np.uint8) for k in kinds])
        else:
            stacked = np.zeros((0, height, width), dtype=np.uint8)
        out_img, out_masks = self.pipeline(img, tv_tensors.Mask(torch.from_numpy(stacked)))
        image_tensor = out_img.as_subclass(torch.Tensor).contiguous()
        mask_tensor = (out_masks.as_subclass(torch.Tensor) > 0).to(torch.float32)
        return image_tensor, {k: mask_tensor[i].contiguous() for i, k in enumerate(kinds)}


def build_transforms(
    data_config: Mapping[str, Any] | DataConfig, augmentation: Augmentation | Mapping[str, Any] | None = None
) -> tuple[JointTransform, JointTransform]:
    """``(train_transform, eval_transform)`` for a model's data config and the training augmentation."""
    return JointTransform(data_config, train=True, augmentation=augmentation), JointTransform(data_config, train=False)
