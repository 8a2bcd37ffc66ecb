"""The Grounded-SAM grounder: GroundingDINO boxes for each text prompt, SAM masks for the boxes.

For a prompt (a concept, or the class name for the object mask), GroundingDINO proposes boxes; those whose
score exceeds `box_threshold` are segmented by SAM, and the prompt's mask is the union of the box masks
(empty when no box passes). Each prompt gets its own detector query, as in the CFT release, so boxes map to
concepts unambiguously; the prompts of one image go through the detector as one batch of `prompt_batch`.
SAM's image encoder (most of its cost) runs once per image, and the boxes of all prompts are decoded in one
call. Defaults: GroundingDINO's box 0.35 / text 0.25 (the GroundingDINO README; the CFT release uses
0.35 / 0.65 with grounding-dino-base); prompts are lower-cased and end with ".". The detector is any hub id
or local folder (`AutoModelForZeroShotObjectDetection`); SAM is a hub id or folder (transformers `SamModel`)
or an official `sam_vit_{b,l,h}_*.pth` file (the `segment-anything` package): see `sam_backends.py`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cft_lightning.data.image_folder import load_image
from cft_lightning.masks.sam_backends import SegmentAnythingSAM, TransformersSAM, build_segmenter

__all__ = ["GroundedSAM"]


class GroundedSAM:
    """A `Grounder` (see concepts.validate) over the images under `images_root`; `segmenter` is a spec string
    (`sam_backends.build_segmenter`) or a backend object already built."""

    def __init__(
        self,
        images_root: str | os.PathLike[str],
        detector: str = "IDEA-Research/grounding-dino-base",
        segmenter: str | SegmentAnythingSAM | TransformersSAM = "facebook/sam-vit-base",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        device: str = "cpu",
        prompt_batch: int = 8,
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if prompt_batch < 1:
            raise ValueError(f"prompt_batch must be >= 1, got {prompt_batch}")
        # SAM first: a wrong checkpoint file stops here, before the detector loads and before any image
        self.segmenter = build_segmenter(segmenter, device) if isinstance(segmenter, str) else segmenter
        self.sam = self.segmenter.model  # an nn.Module attribute: `MaskGeneration` moves it to the device
        self.images_root = Path(images_root)
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.prompt_batch = prompt_batch
        self.device = torch.device(device)
        self.det_processor = AutoProcessor.from_pretrained(detector)
        self.detector = AutoModelForZeroShotObjectDetection.from_pretrained(detector).to(self.device).eval()

    @staticmethod
    def prompt_text(prompt: str) -> str:
        text = prompt.lower().strip()
        return text if text.endswith(".") else text + "."

    @torch.inference_mode()
    def detect(self, image: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
        """For each prompt, its (n, 4) xyxy pixel boxes above the box threshold (one batched forward)."""
        texts = [self.prompt_text(p) for p in prompts]
        # the image is resized and normalised once and shared by the batch's prompts (a view, no copy): the
        # processor used to do it once per prompt, 3x the host-side cost that a GPU does not speed up
        inputs = self.det_processor(images=image, text=texts, padding=True, return_tensors="pt").to(self.device)
        for key in ("pixel_values", "pixel_mask"):
            inputs[key] = inputs[key].expand(len(texts), *inputs[key].shape[1:])
        outputs = self.detector(**inputs)
        results = self.det_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)] * len(texts))
        return [r["boxes"].float().cpu() for r in results]

    def boxes(self, image: Any, prompt: str) -> torch.Tensor:
        """(n, 4) xyxy pixel boxes for one prompt."""
        return self.detect(image, [prompt])[0]

    def embed(self, image: Any) -> dict[str, Any]:
        """SAM's encoding of the image (once per image; what `segment_boxes` decodes from)."""
        return self.segmenter.embed(image)

    def segment_boxes(self, image: Any, boxes: torch.Tensor, embedding: dict[str, Any]) -> torch.Tensor:
        """(n, H, W) bool: SAM's mask for each box, all decoded in one call on the image's embedding."""
        return self.segmenter.segment_boxes(image, boxes, embedding)

    def segment(self, image: Any, boxes: torch.Tensor) -> np.ndarray:
        """(H, W) bool: the union of SAM's masks for `boxes`."""
        if len(boxes) == 0:
            return np.zeros((image.height, image.width), dtype=bool)
        return self.segment_boxes(image, boxes, self.embed(image)).any(dim=0).numpy()

    def __call__(self, rel: str, class_name: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        image = load_image(self.images_root / rel)
        found: list[torch.Tensor] = []
        for start in range(0, len(prompts), self.prompt_batch):
            found += self.detect(image, prompts[start:start + self.prompt_batch])
        out = {p: np.zeros((image.height, image.width), dtype=bool) for p in prompts}
        if sum(len(b) for b in found) == 0:
            return out
        masks = self.segment_boxes(image, torch.cat(found), self.embed(image))
        owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(b) for b in found]))
        for i, prompt in enumerate(prompts):
            out[prompt] = masks[owner == i].any(dim=0).numpy()
        return out
