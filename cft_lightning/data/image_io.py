"""Reading images: which files are images, and opening one as RGB whatever its mode or bit depth."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from cft_lightning.data.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "is_image_file", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(name: str) -> bool:
    """Visible file with an image extension (case-insensitive)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)



def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully and convert it to RGB (grayscale/palette/CMYK converted; an alpha channel is dropped
    without compositing). 16-bit and 32-bit grayscale (X-rays are often 16-bit PNGs) is scaled into 8 bits
    (16-bit: v / 257; integer or float images outside that range: min-max), not clipped at 255 as Pillow's own
    conversion would. Unreadable, truncated or empty files raise DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode.startswith("I") or img.mode == "F":
                return _wide_to_rgb(img)
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"image file {path} cannot be read: {exc}") from exc


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (values.min() >= 0 and values.max() <= 65535 and img.mode != "F"):
        scaled = values / 257.0
    elif img.mode == "F" and values.min() >= 0 and values.max() <= 1:
        scaled = values * 255.0
    else:
        low, high = values.min(), values.max()
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
