"""The two SAM backends of the Grounded-SAM grounder: transformers `SamModel`, and Meta's `segment-anything`.

`--segmenter` picks one by its form:

* a hub id or a local folder (`facebook/sam-vit-base`, the default): transformers `SamModel` + `SamProcessor`;
* an official checkpoint file, `vit_b:/ckpt/sam_vit_b_01ec64.pth` (`vit_l:` ... `sam_vit_l_0b3195.pth`, `vit_h:`
  ... `sam_vit_h_4b8939.pth`), or the bare path of a `.pth`/`.pt` file (its variant is then read from its
  weights): `segment_anything.sam_model_registry[variant]` + `SamPredictor`, as Grounded-SAM runs it.

Both backends encode an image once (`embed`) and decode all the boxes of all its prompts in one call
(`segment_boxes`), and both return (n, H, W) bool masks at the image's size, thresholded at SAM's
`mask_threshold` (0.0 on the logits), so the grounder and the mask store do not depend on which one ran.

The checkpoint file is checked before any image is processed: a missing file, a file `torch.load` cannot read
(truncated, not a PyTorch file), or weights of another variant than the one named (told apart by the image
encoder's width and depth) stop with one line naming the file (`DataError`). `segment-anything`'s own loader
has no `map_location`, so the model is built empty (`checkpoint=None`) and the file is loaded here onto the CPU,
which lets CUDA-saved checkpoints load on a CPU-only machine.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cft_lightning.errors import DataError

__all__ = ["OFFICIAL_FILES", "VARIANTS", "SegmentAnythingSAM", "TransformersSAM", "build_segmenter",
           "parse_segmenter", "read_sam_checkpoint", "sam_variant"]

# image encoder (width, blocks) of each `sam_model_registry` variant, as in segment_anything/build_sam.py
VARIANTS: dict[str, tuple[int, int]] = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
OFFICIAL_FILES = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
_WIDTH_KEY = "image_encoder.patch_embed.proj.weight"


def parse_segmenter(spec: str) -> tuple[str | None, str] | None:
    """(variant or None, checkpoint path) when `spec` names a segment-anything checkpoint (`vit_b:FILE`, or a
    `.pth`/`.pt` path whose variant is read from the file), None for a transformers hub id or folder."""
    head, sep, tail = spec.partition(":")
    if sep and head in VARIANTS:
        return head, tail
    if sep and re.fullmatch(r"vit_\w+", head):
        raise DataError(f"--segmenter {spec}: unknown SAM variant {head!r} (one of {', '.join(VARIANTS)})")
    if Path(spec).suffix in (".pth", ".pt"):
        return None, spec
    return None


def _describe(width: int, depth: int) -> str:
    return f"image encoder width {width}, {depth} blocks"


def sam_variant(state: dict[str, Any], path: str) -> str:
    """The `sam_model_registry` variant whose image encoder has the state dict's width and depth."""
    if _WIDTH_KEY not in state:
        raise DataError(f"SAM checkpoint {path} is not a segment-anything SAM state dict (no {_WIDTH_KEY})")
    width = int(state[_WIDTH_KEY].shape[0])
    depth = len({m.group(1) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    for name, shape in VARIANTS.items():
        if shape == (width, depth):
            return name
    known = ", ".join(f"{n} ({w}, {d})" for n, (w, d) in VARIANTS.items())
    raise DataError(f"SAM checkpoint {path} has {_describe(width, depth)}: none of the segment-anything "
                    f"variants (width, blocks) {known}")


def read_sam_checkpoint(path: str, variant: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(variant, state dict) of an official SAM checkpoint file, loaded onto the CPU; a missing or unreadable
    file, or weights of another variant than `variant`, raise DataError naming the file."""
    if variant is not None and variant not in VARIANTS:
        raise DataError(f"SAM variant {variant!r} for {path} is none of {', '.join(VARIANTS)}")
    if not Path(path).is_file():
        official = ", ".join(OFFICIAL_FILES.values())
        raise DataError(f"SAM checkpoint {path} does not exist (the official files: {official})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled code: all "cannot be read"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"SAM checkpoint {path} cannot be read (truncated or not a PyTorch file?): {reason}") from None
    if not isinstance(state, dict):
        raise DataError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    found = sam_variant(state, path)
    if variant is not None and found != variant:
        raise DataError(f"SAM checkpoint {path} holds {found} weights ({_describe(*VARIANTS[found])}), not "
                        f"{variant}: give --segmenter {found}:{path}")
    return found, state


def _segment_anything() -> Any:
    try:
        import segment_anything
    except (ImportError, RuntimeError) as exc:  # RuntimeError: a torchvision built for another torch
        raise ImportError(f"the segment-anything SAM backend needs `pip install segment-anything` and a "
                          f"torchvision matching torch {torch.__version__} (import failed: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from exc
    return segment_anything


class SegmentAnythingSAM:
    """SAM through Meta's `segment-anything` package (`SamPredictor`): the official `sam_vit_*.pth` files."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.predictor = _segment_anything().SamPredictor(self.model)

    @classmethod
    def from_checkpoint(cls, path: str, variant: str | None = None, device: str = "cpu") -> SegmentAnythingSAM:
        """`sam_model_registry[variant]` with the file's weights (checked first: see `read_sam_checkpoint`)."""
        found, state = read_sam_checkpoint(path, variant)
        model = _segment_anything().sam_model_registry[found](checkpoint=None)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise DataError(f"SAM checkpoint {path} does not fit sam_model_registry[{found!r}]: "
                            f"{str(exc).splitlines()[0]}") from None
        return cls(model.to(device))

    @torch.inference_mode()
    def embed(self, image: Any) -> dict[str, Any]:
        """The image encoder's output (once per image) and the sizes `predict_torch` needs."""
        self.predictor.set_image(np.asarray(image.convert("RGB")), image_format="RGB")
        p = self.predictor
        return {"features": p.features, "original_size": p.original_size, "input_size": p.input_size}

    @torch.inference_mode()
    def segment_boxes(self, image: Any, boxes: torch.Tensor, embedding: dict[str, Any]) -> torch.Tensor:
        """(n, H, W) bool: SAM's mask for each xyxy pixel box, all in one `predict_torch` call."""
        if len(boxes) == 0:
            return torch.zeros((0, image.height, image.width), dtype=torch.bool)
        p = self.predictor
        p.features, p.original_size, p.input_size = (embedding["features"], embedding["original_size"],
                                                     embedding["input_size"])
        p.is_image_set = True
        moved = p.transform.apply_boxes_torch(boxes.to(p.device), p.original_size)
        masks, _, _ = p.predict_torch(None, None, boxes=moved, multimask_output=False)
        return masks[:, 0].cpu()


class TransformersSAM:
    """SAM through transformers (`SamModel`, `SamProcessor`): a hub id such as `facebook/sam-vit-base`, or a
    folder written by `save_pretrained`. The image processor is the PIL one whether or not torchvision is
    installed: it resizes as segment-anything does (PIL bilinear), while the torchvision one rounds some
    resized pixels one grey level apart, which can flip mask pixels whose logit is near the threshold."""

    def __init__(self, name_or_path: str, device: str = "cpu") -> None:
        from transformers import SamModel, SamProcessor

        self.processor = SamProcessor.from_pretrained(name_or_path, backend="pil")
        self.model = SamModel.from_pretrained(name_or_path).to(device).eval()

    @torch.inference_mode()
    def embed(self, image: Any) -> dict[str, torch.Tensor]:
        """SAM's image embedding and the sizes its post-processing needs (the encoder: once per image)."""
        inputs = self.processor(images=image, return_tensors="pt").to(self.model.device)
        return {"image_embeddings": self.model.get_image_embeddings(inputs["pixel_values"]),
                "original_sizes": inputs["original_sizes"].cpu(),
                "reshaped_input_sizes": inputs["reshaped_input_sizes"].cpu()}

    @torch.inference_mode()
    def segment_boxes(self, image: Any, boxes: torch.Tensor, embedding: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, H, W) bool: SAM's mask for each xyxy pixel box, all decoded in one call on the embedding."""
        if len(boxes) == 0:
            return torch.zeros((0, image.height, image.width), dtype=torch.bool)
        # boxes into the resized frame SAM's encoder saw (what the processor does given the image again)
        (h, w), (rh, rw) = embedding["original_sizes"][0].tolist(), embedding["reshaped_input_sizes"][0].tolist()
        scaled = boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h])
        outputs = self.model(image_embeddings=embedding["image_embeddings"],
                             input_boxes=scaled[None].to(self.model.device), multimask_output=False)
        masks = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), embedding["original_sizes"], embedding["reshaped_input_sizes"])[0]
        return masks.reshape(-1, image.height, image.width).bool()


def build_segmenter(spec: str, device: str = "cpu") -> SegmentAnythingSAM | TransformersSAM:
    """The backend `spec` names (see the module docstring); a checkpoint file is checked before it returns."""
    parsed = parse_segmenter(spec)
    if parsed is None:
        return TransformersSAM(spec, device)
    variant, path = parsed
    return SegmentAnythingSAM.from_checkpoint(path, variant, device)
