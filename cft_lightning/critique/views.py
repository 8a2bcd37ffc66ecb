"""What the critic is shown, and the way back to the image: segment map, overlay, and the inverse geometry.

Attribution and segments live on the model's view of an image (the eval transform: resize, then center
crop). The critic sees that view (what the model saw), a colour-coded segment map with each segment's
number at its centre, and the segments blended over the view. The corrective mask is drawn back onto the
image's own resolution for the mask store (`to_original`); pixels the crop cut away belong to no segment.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from cft_lightning.data.transforms import DataConfig

__all__ = ["PALETTE", "data_url", "overlay", "segment_map", "to_original", "view_scale"]

# (name, RGB): names the critic can refer to; distinct under common colour-vision deficiencies first
PALETTE = (
    ("red", (230, 25, 75)), ("blue", (0, 130, 200)), ("yellow", (255, 225, 25)), ("green", (60, 180, 75)),
    ("orange", (245, 130, 48)), ("purple", (145, 30, 180)), ("cyan", (70, 240, 240)), ("magenta", (240, 50, 230)),
    ("lime", (210, 245, 60)), ("brown", (170, 110, 40)), ("navy", (0, 0, 128)), ("grey", (128, 128, 128)),
)


def _colours(segments: np.ndarray) -> np.ndarray:
    count = int(segments.max()) + 1 if segments.size else 0
    if count > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} segments can be shown to the critic, got {count}")
    lut = np.array([rgb for _, rgb in PALETTE] + [(0, 0, 0)], dtype=np.uint8)
    return lut[np.where(segments < 0, len(PALETTE), segments)]


def _label(image: Image.Image, segments: np.ndarray) -> Image.Image:
    """Write each segment's number (1-based) at its most central pixel."""
    draw = ImageDraw.Draw(image)
    for j in np.unique(segments[segments >= 0]):
        rows, cols = np.nonzero(segments == j)
        centre = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
        x, y = int(cols[centre]), int(rows[centre])
        draw.rectangle((x - 5, y - 6, x + 6, y + 6), fill=(255, 255, 255))
        draw.text((x - 3, y - 6), str(int(j) + 1), fill=(0, 0, 0))
    return image


def segment_map(segments: np.ndarray, scale: int = 1) -> Image.Image:
    """The segments in their palette colours, numbered; upscaled by `scale` (nearest) for legibility."""
    image = Image.fromarray(_colours(segments))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        segments = np.kron(segments, np.ones((scale, scale), dtype=segments.dtype))
    return _label(image, segments)


def overlay(view: np.ndarray, segments: np.ndarray, alpha: float = 0.45, scale: int = 1) -> Image.Image:
    """The view (H, W, 3) uint8 with the segment colours blended in and the segments numbered."""
    mixed = (1 - alpha) * view.astype(np.float64) + alpha * _colours(segments)
    image = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        segments = np.kron(segments, np.ones((scale, scale), dtype=segments.dtype))
    return _label(image, segments)


def data_url(image: Image.Image) -> str:
    """A PNG data URL (what OpenAI-compatible vision endpoints take in `image_url`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_original(view_map: np.ndarray, original_size: tuple[int, int], config: DataConfig) -> np.ndarray:
    """Draw a map on the eval view (h, w) back onto the original (H, W) image: undo the center crop (pixels
    outside it get -1) and the resize (nearest). Mirrors `JointTransform(train=False)`'s geometry."""
    height, width = original_size
    crop_h, crop_w = config.input_size
    resize_h, resize_w = config.resize_size
    if crop_h == crop_w:  # torchvision Resize(int): the shorter side to resize_h, the other in proportion
        short, long = min(height, width), max(height, width)
        new_long = int(resize_h * long / short)
        resize_h, resize_w = (resize_h, new_long) if height <= width else (new_long, resize_h)
    canvas = np.full((resize_h, resize_w), -1, dtype=np.int64)
    top = int(round((resize_h - crop_h) / 2.0))
    left = int(round((resize_w - crop_w) / 2.0))
    # torchvision pads when the crop is larger than the image; only the overlapping part maps back
    src_top, src_left = max(0, -top), max(0, -left)
    dst_top, dst_left = max(0, top), max(0, left)
    h = min(crop_h - src_top, resize_h - dst_top)
    w = min(crop_w - src_left, resize_w - dst_left)
    canvas[dst_top:dst_top + h, dst_left:dst_left + w] = view_map[src_top:src_top + h, src_left:src_left + w]
    rows = np.minimum((np.arange(height) + 0.5) * resize_h / height, resize_h - 1e-9).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * resize_w / width, resize_w - 1e-9).astype(np.int64)
    return canvas[np.ix_(rows, cols)]


def view_scale(size: int, target: int = 448) -> int:
    """Integer upscaling that brings a small view near `target` pixels for the critic (1 for large views)."""
    return max(1, math.floor(target / max(size, 1)))
