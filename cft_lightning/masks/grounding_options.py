"""The Grounded-SAM options shared by `cft masks generate` and `cft concepts validate` (one place, one default).

Both commands take a `GroundingOptions` parameter that `_tool_cli.Tool(flatten=("grounding",))` turns into the
top-level flags `--detector`, `--segmenter`, `--box_threshold` and `--text_threshold`. `--segmenter` also picks
the SAM backend: a hub id or folder runs transformers `SamModel`; an official checkpoint file
(`vit_b:sam_vit_b_01ec64.pth`, `vit_l:sam_vit_l_0b3195.pth`, `vit_h:sam_vit_h_4b8939.pth`, or a bare `.pth`
path) runs Meta's `segment-anything` (`masks/sam_backends.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DETECTOR", "GROUNDING", "SEGMENTER", "GroundingOptions"]

DETECTOR = "IDEA-Research/grounding-dino-base"
SEGMENTER = "facebook/sam-vit-base"


@dataclass(frozen=True)
class GroundingOptions:
    """The GroundingDINO + SAM models and thresholds (the CFT paper's Grounded-SAM setup).

    Args:
        detector: GroundingDINO: hub id or local folder
        segmenter: SAM: a hub id or local folder (transformers SamModel), or an official segment-anything
            checkpoint as VARIANT:FILE, e.g. vit_b:sam_vit_b_01ec64.pth (vit_b, vit_l, vit_h; a bare .pth path:
            the variant is read from the file)
        box_threshold: GroundingDINO box score threshold
        text_threshold: GroundingDINO text score threshold
    """

    detector: str = DETECTOR
    segmenter: str = SEGMENTER
    box_threshold: float = 0.35
    text_threshold: float = 0.25


GROUNDING = GroundingOptions()  # the defaults, as a parameter default
