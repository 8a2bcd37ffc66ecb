"""The Grounded-SAM options shared by `cft masks generate` and `cft concepts validate` (one place, one default).

Both commands take a `GroundingOptions` parameter that `_tool_cli.Tool(flatten=("grounding",))` turns into the
top-level flags `--detector`, `--segmenter`, `--box_threshold` and `--text_threshold`.
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
        segmenter: SAM: hub id or local folder
        box_threshold: GroundingDINO box score threshold
        text_threshold: GroundingDINO text score threshold
    """

    detector: str = DETECTOR
    segmenter: str = SEGMENTER
    box_threshold: float = 0.35
    text_threshold: float = 0.25


GROUNDING = GroundingOptions()  # the defaults, as a parameter default
