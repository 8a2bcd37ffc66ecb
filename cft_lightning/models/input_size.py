"""The data's native image size against the model's input size: a warning before a silent 49x.

Without `data.data_config`, images are resized to the input size of the model's timm data config: 224 px for
most ImageNet models, whatever the data. 32 px digits then train at 224 px (about 49x the compute) and a
224 px model gets thumbnails. `input_size_warning` says so once per run, naming the setting to change.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MAX_SCALE", "input_size_warning", "native_image_size"]

MAX_SCALE = 2.0  # warn when a side is resized by more than this factor (up or down)
_SAMPLE = 16  # images whose header is read per run


def _datasets(datamodule: Any, stage: str) -> list[Any]:
    names = {"fit": ["train_dataset", "val_dataset"], "validate": ["val_dataset"], "test": ["test_dataset"],
             "predict": ["predict_dataset"]}.get(stage, [])
    found: list[Any] = []
    for name in names:
        value = getattr(datamodule, name, None)
        found += list(value) if isinstance(value, list | tuple) else [value] if value is not None else []
    return found


def native_image_size(datamodule: Any, stage: str) -> tuple[int, int] | None:
    """Median (height, width) of the first images of `stage`'s datasets (headers only); None if unknown."""
    from PIL import Image

    sizes: list[tuple[int, int]] = []
    for dataset in _datasets(datamodule, stage):
        root, samples = getattr(dataset, "root", None), getattr(dataset, "samples", None)
        if root is None or not isinstance(samples, Sequence):
            continue
        for sample in samples[: _SAMPLE - len(sizes)]:
            try:
                with Image.open(Path(root) / sample.path) as image:
                    width, height = image.size
            except Exception:  # an unreadable file is the data loader's to report, with its name
                continue
            sizes.append((height, width))
        if len(sizes) >= _SAMPLE:
            break
    if not sizes:
        return None
    return int(statistics.median(h for h, _ in sizes)), int(statistics.median(w for _, w in sizes))


def input_size_warning(native: tuple[int, int] | None, input_size: Sequence[int], model_name: str,
                       patch_model: bool = False) -> str | None:
    """One line when the shorter side of the model's input (`input_size`, (C, H, W) or (H, W)) is more than
    `MAX_SCALE` times larger or smaller than the shorter side of the data's images (the eval transform resizes
    the shorter side); None otherwise. `patch_model`: a ViT, whose input size is `model_kwargs.img_size`."""
    if native is None:
        return None
    height, width = (int(s) for s in tuple(input_size)[-2:])
    side, native_side = min(height, width), min(native)
    scale = max(side / native_side, native_side / side)
    if scale <= MAX_SCALE:
        return None
    seen = f"the data's images are about {native[1]}x{native[0]} px but {model_name} takes {width}x{height} (its " \
           "timm data config)"
    if side > native_side:
        setting = (f"model.backbone.model_kwargs.img_size: {native_side}" if patch_model else
                   f"data.data_config (input_size: [3, {native[0]}, {native[1]}] and the model's mean and std)")
        return (f"{seen}: every image is upsampled {scale:.1f}x per side ({scale ** 2:.0f}x the pixels); "
                f"set {setting} to work at the data's size")
    setting = "model.backbone.model_kwargs.img_size" if patch_model else "data.data_config.input_size"
    return f"{seen}: every image is downsampled {scale:.1f}x per side; if small details matter, set {setting}"
