"""Reading images: which files are images, and opening one as RGB whatever its mode or bit depth.

Which files are images: every extension Pillow registers for a format it can open (``PIL.Image.
registered_extensions()``, so a plugin such as pillow-heif that registers ``.heic`` counts once imported),
except formats nobody would call an image: documents (PDF, PostScript), video and animation (MPEG, FLI),
scientific data containers (FITS, HDF5, GRIB, BUFR), IPTC news metadata and Windows-only vector metafiles
(WMF/EMF); and Pillow's multi-picture JPEG ``.mpo``, which the JPEG opener reads. Hidden files (a leading dot)
are never images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cft_lightning.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "NON_IMAGE_FORMATS", "image_extensions", "is_image_file", "load_image",
           "skipped_summary"]

# Pillow formats that are readable but are not what a user calls an image (see the module docstring).
NON_IMAGE_FORMATS = frozenset({"BUFR", "EPS", "FITS", "FLI", "GRIB", "HDF5", "IPTC", "MPEG", "PDF", "WMF"})
_EXTRA_EXTENSIONS = (".mpo",)  # multi-picture JPEG: opened by the JPEG plugin, so not in Image.OPEN
_cache: tuple[int, frozenset[str]] = (-1, frozenset())


def _extension_set() -> frozenset[str]:
    global _cache
    registered = Image.registered_extensions()  # imports Pillow's plugins on first use
    if _cache[0] != len(registered) + len(Image.OPEN):  # recomputed when a plugin registers more formats
        readable = {e.lower() for e, fmt in registered.items() if fmt in Image.OPEN and fmt not in NON_IMAGE_FORMATS}
        _cache = (len(registered) + len(Image.OPEN), frozenset(readable | set(_EXTRA_EXTENSIONS)))
    return _cache[1]


def image_extensions() -> tuple[str, ...]:
    """Sorted lower-case extensions (with the dot) of the image formats Pillow can open now."""
    return tuple(sorted(_extension_set()))


IMAGE_EXTENSIONS = image_extensions()  # at import; `image_extensions()` also sees plugins registered later


def is_image_file(name: str) -> bool:
    """Visible file with the extension of an image format Pillow reads (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in _extension_set()


def skipped_summary(where: str | os.PathLike[str], skipped: Sequence[str], full_list: str | None = None,
                    first: int = 5) -> str:
    """One line naming skipped files: their count, the first few, and where the full list is."""
    names = ", ".join(str(s) for s in skipped[:first]) + (", ..." if len(skipped) > first else "")
    tail = f"; full list in {full_list}" if full_list else ""
    return f"skipped {len(skipped)} file(s) in {where} that are not images Pillow reads: {names}{tail}"


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
