"""The Grounded-SAM options shared by `cft masks generate` and `cft concepts validate` (one place, one default)."""

from __future__ import annotations

import argparse

__all__ = ["DETECTOR", "SEGMENTER", "add_grounding_options"]

DETECTOR = "IDEA-Research/grounding-dino-base"
SEGMENTER = "facebook/sam-vit-base"


def add_grounding_options(parser: argparse.ArgumentParser) -> None:
    """--detector, --segmenter, --box_threshold, --text_threshold, with their defaults."""
    parser.add_argument("--detector", default=DETECTOR,
                        help="GroundingDINO: hub id or local folder (default: %(default)s)")
    parser.add_argument("--segmenter", default=SEGMENTER, help="SAM: hub id or local folder (default: %(default)s)")
    parser.add_argument("--box_threshold", type=float, default=0.35,
                        help="GroundingDINO box score threshold (default: %(default)s)")
    parser.add_argument("--text_threshold", type=float, default=0.25,
                        help="GroundingDINO text score threshold (default: %(default)s)")
