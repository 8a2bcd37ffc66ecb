"""Drawing one image of the shortcut-parts benchmark: a creature made of a body and discriminative parts,
on a textured background. Pure numpy; every random choice comes from the generator passed in.

All shapes are defined in the creature's own coordinates (u along the body, v across it, in units of the
body's half-length), so rotation, mirroring and scale move every part and its mask together.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

# The concept vocabulary. Every class carries a fixed pair of parts; every part is shared by several
# classes, and the body is the same for all, so neither a single part nor the silhouette is the cue.
PARTS = ("round eye", "striped fin", "forked tail", "spotted belly", "pointed horn")

# One background per class: the shortcut. (name, base RGB in [0, 1], pattern)
BACKGROUNDS = (
    ("grass", (0.30, 0.62, 0.22), "noise"),
    ("water", (0.18, 0.38, 0.78), "waves"),
    ("sand", (0.86, 0.76, 0.46), "speckle"),
    ("brick", (0.66, 0.24, 0.18), "grid"),
    ("dusk", (0.52, 0.34, 0.62), "gradient"),
    ("snow", (0.90, 0.92, 0.95), "noise"),
    ("forest", (0.10, 0.32, 0.16), "stripes"),
    ("night", (0.08, 0.08, 0.16), "speckle"),
    ("rust", (0.78, 0.46, 0.12), "waves"),
    ("slate", (0.42, 0.46, 0.50), "grid"),
)
DECOY_COLOURS = tuple(colorsys.hsv_to_rgb(i / len(BACKGROUNDS), 0.9, 0.95) for i in range(len(BACKGROUNDS)))


@dataclass
class Rendered:
    """One drawn sample: the image and its boolean masks (all (size, size))."""

    image: np.ndarray  # uint8 (size, size, 3)
    object: np.ndarray
    parts: dict[str, np.ndarray]
    decoy: np.ndarray

    @property
    def concept(self) -> np.ndarray:
        """The concept mask S(I): the union (max) of the part masks."""
        out = np.zeros_like(self.object)
        for mask in self.parts.values():
            out |= mask
        return out


def _background(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    _, base, pattern = BACKGROUNDS[kind]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    base = np.clip(np.asarray(base) + rng.normal(0.0, 0.04, 3), 0.0, 1.0)
    if pattern == "noise":
        coarse = rng.normal(0.0, 0.10, (size // 8 + 1, size // 8 + 1, 1))
        shade = np.kron(coarse, np.ones((8, 8, 1)))[:size, :size]
    elif pattern == "waves":
        phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(5.0, 8.0)
        shade = 0.12 * np.sin(2 * np.pi * freq * (yy + 0.15 * np.sin(2 * np.pi * 2 * xx)) + phase)[..., None]
    elif pattern == "speckle":
        shade = 0.25 * (rng.random((size, size, 1)) < 0.08) - 0.04
    elif pattern == "grid":
        period = rng.uniform(0.14, 0.2)
        offset = 0.5 * period * (np.mod(yy, 2 * period) < period)
        lines = (np.mod(yy, period) < 0.03) | (np.mod(xx + offset, period) < 0.03)
        shade = -0.25 * lines[..., None]
    elif pattern == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        shade = 0.25 * ((np.cos(angle) * xx + np.sin(angle) * yy) - 0.5)[..., None]
    else:  # stripes
        period, angle = rng.uniform(0.1, 0.16), rng.uniform(-0.5, 0.5)
        shade = 0.15 * (np.mod(np.cos(angle) * xx + np.sin(angle) * yy, period) < period / 2)[..., None] - 0.07
    return np.clip(base + shade + rng.normal(0.0, 0.02, (size, size, 3)), 0.0, 1.0)


def _part_masks(u: np.ndarray, v: np.ndarray, body: np.ndarray) -> dict[str, np.ndarray]:
    """Region of every part in creature coordinates (drawn or not)."""
    t = (-0.9 - u) / 0.75  # 0 where the tail meets the body, 1 at its end
    fin_h = (-0.38 - v) / 0.72  # 0 at the back of the body, 1 at the fin's tip
    horn_h = (-0.4 - v) / 0.62  # 0 at the horn's base on the head, 1 at its tip
    return {
        "round eye": (u - 0.56) ** 2 + (v + 0.06) ** 2 <= 0.26**2,
        "striped fin": (fin_h >= 0) & (fin_h <= 1) & (np.abs(u + 0.05) <= 0.45 * (1 - fin_h)),
        "forked tail": (t >= 0) & (t <= 1) & (np.abs(v) <= 0.15 + 0.6 * t)
        & ~((t > 0.45) & (np.abs(v) < 0.55 * (t - 0.45))),
        "spotted belly": body & (v >= 0.16) & (np.abs(u + 0.05) <= 0.55),
        "pointed horn": (horn_h >= 0) & (horn_h <= 1) & (u >= 0.4 + 0.38 * horn_h) & (u <= 0.82 - 0.04 * horn_h),
    }


def _paint_part(image: np.ndarray, name: str, region: np.ndarray, u: np.ndarray, v: np.ndarray,
                rng: np.random.Generator) -> None:
    jitter = rng.normal(0.0, 0.04, 3)
    if name == "round eye":
        image[region] = np.clip(0.95 + jitter, 0, 1)
        pupil = region & ((u - 0.6) ** 2 + (v + 0.06) ** 2 <= 0.12**2)
        image[pupil] = 0.05
    elif name == "striped fin":
        stripes = np.mod(u * 5.0, 1.0) < 0.5
        image[region & stripes] = np.clip(np.array([0.98, 0.85, 0.10]) + jitter, 0, 1)
        image[region & ~stripes] = 0.08
    elif name == "forked tail":
        image[region] = np.clip(np.array([0.20, 0.12, 0.35]) + jitter, 0, 1)
    elif name == "spotted belly":
        image[region] = np.clip(np.array([0.93, 0.90, 0.80]) + jitter, 0, 1)
        spots = ((np.mod(u * 4.5, 1.0) - 0.5) ** 2 + (np.mod(v * 4.5, 1.0) - 0.5) ** 2) < 0.06
        image[region & spots] = np.clip(np.array([0.55, 0.05, 0.05]) + jitter, 0, 1)
    else:  # pointed horn
        image[region] = np.clip(np.array([0.92, 0.92, 0.70]) + jitter, 0, 1)


def render(parts: tuple[str, ...], background: int, size: int, rng: np.random.Generator,
           decoy: int | None = None, decoy_side: int | None = None) -> Rendered:
    """Draw a creature carrying `parts` on background `background` (index into BACKGROUNDS); with `decoy`, a
    square of colour DECOY_COLOURS[decoy] in a random corner, `decoy_side` pixels wide (default
    max(3, size // 12))."""
    image = _background(background, size, rng)
    scale = size * rng.uniform(0.23, 0.28)
    margin = 1.5 * scale
    cy, cx = rng.uniform(margin, size - margin, 2) if size > 2 * margin else (size / 2, size / 2)
    theta = rng.uniform(-np.pi / 6, np.pi / 6)
    flip = 1.0 if rng.random() < 0.5 else -1.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    u = flip * (np.cos(theta) * dx + np.sin(theta) * dy) / scale
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / scale
    body = (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
    regions = _part_masks(u, v, body)
    hue = rng.random()
    body_colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.35, 0.7), rng.uniform(0.55, 0.85)))
    image[body] = np.clip(body_colour + rng.normal(0.0, 0.02, (int(body.sum()), 3)), 0, 1)
    drawn: dict[str, np.ndarray] = {}
    for name in parts:
        region = regions[name]
        _paint_part(image, name, region, u, v, rng)
        drawn[name] = region
    obj = body.copy()
    for region in drawn.values():
        obj |= region
    decoy_mask = np.zeros((size, size), dtype=bool)
    if decoy is not None:
        side = decoy_side or max(3, size // 12)
        y0 = 1 if rng.random() < 0.5 else size - side - 1
        x0 = 1 if rng.random() < 0.5 else size - side - 1
        decoy_mask[y0:y0 + side, x0:x0 + side] = True
        image[decoy_mask] = DECOY_COLOURS[decoy]
        obj &= ~decoy_mask  # the decoy covers whatever it lands on: masks say what is visible
        drawn = {name: region & ~decoy_mask for name, region in drawn.items()}
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return Rendered(image=pixels, object=obj, parts=drawn, decoy=decoy_mask)
