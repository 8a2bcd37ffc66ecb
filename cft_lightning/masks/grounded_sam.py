"""The Grounded-SAM grounder: GroundingDINO boxes for each text prompt, SAM masks for the boxes (transformers).

For a prompt (a concept, or the class name for the object mask), GroundingDINO proposes boxes; those whose
score exceeds `box_threshold` are segmented by SAM, and the prompt's mask is the union of the box masks
(empty when no box passes). One detector forward per prompt, as the CFT release does, so boxes map to
concepts unambiguously. Defaults: GroundingDINO's box 0.35 / text 0.25 (the GroundingDINO README; the CFT
release uses 0.35 / 0.65 with grounding-dino-base); prompts are lower-cased and end with ".". Any hub id or
local folder works for both models (`AutoModelForZeroShotObjectDetection`, `SamModel`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cft_lightning.data.image_folder import load_image

__all__ = ["GroundedSAM"]


class GroundedSAM:
    """A `Grounder` (see concepts.validate) over the images under `images_root`."""

    def __init__(
        self,
        images_root: str | os.PathLike[str],
        detector: str = "IDEA-Research/grounding-dino-base",
        segmenter: str = "facebook/sam-vit-base",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str = "cpu",
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

        self.images_root = Path(images_root)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.device = torch.device(device)
        self.det_processor = AutoProcessor.from_pretrained(detector)
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector).to(self.device).eval()
        self.sam_processor = SamProcessor.from_pretrained(segmenter)
        self.sam = SamModel.from_pretrained(segmenter).to(self.device).eval()

    @staticmethod
    def prompt_text(prompt: str) -> str:
        text = prompt.lower().strip()
        return text if text.endswith(".") else text + "."

    @torch.inference_mode()
    def boxes(self, image: Any, prompt: str) -> torch.Tensor:
        """(n, 4) xyxy pixel boxes for `prompt` above the box threshold."""
        inputs = self.det_processor(images=image, text=self.prompt_text(prompt), return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        result = self.det_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        return result["boxes"].float().cpu()

    @torch.inference_mode()
    def segment(self, image: Any, boxes: torch.Tensor) -> np.ndarray:
        """(H, W) bool: the union of SAM's masks for `boxes`."""
        union = np.zeros((image.height, image.width), dtype=bool)
        if len(boxes) == 0:
            return union
        inputs = self.sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt").to(self.device)
        outputs = self.sam(**inputs, multimask_output=False)
        masks = self.sam_processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        return union | masks.reshape(-1, image.height, image.width).any(dim=0).numpy()

    def __call__(self, rel: str, class_name: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        image = load_image(self.images_root / rel)
        return {prompt: self.segment(image, self.boxes(image, prompt)) for prompt in prompts}
