"""Throughput of `cft masks generate` and the share of time spent in the models vs our own code.

    python perf/mask_cost.py --images 4       # on a GPU machine; see below for 2 CPU cores

GroundingDINO and SAM are built at their default (full) sizes with random weights, since no checkpoint can be
downloaded here. The time per forward depends on the architecture and the input size, not on the weights; the
boxes found depend on the weights, so the boxes above the threshold are pinned to `--boxes` per prompt.
Generated 640x480 images, 2 concepts per class plus the class prompt. The run is a 1-device
`Trainer.predict` (`cft masks generate`). "Models" is the time inside the grounder's detector and segmenter
calls, including their processors; "ours" is everything else in the run: image loading, the mask union, PNG
writes, the log and Lightning. On 2 CPU cores the full-size models did not finish 4 images in 15 minutes
(2026-11-23), so the figure is still to be measured on a faster machine or with `--images 1`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image


def build_models(root: Path) -> None:
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamModel,
        SamProcessor,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "round", "eye", "striped", "fin", "alpha", "beta"]
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(root / "gd")
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=tokenizer)
    processor.save_pretrained(root / "gd")
    SamModel(SamConfig()).save_pretrained(root / "sam")
    SamProcessor(image_processor=SamImageProcessorPil()).save_pretrained(root / "sam")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=2, help="boxes kept per prompt (pinned: random weights)")
    args = parser.parse_args()
    from cft_lightning.masks.grounded_sam import GroundedSAM
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_models(root)
        rng = np.random.default_rng(0)
        images: dict[str, list[str]] = {"alpha": [], "beta": []}
        for i in range(args.images):
            cls = "alpha" if i % 2 == 0 else "beta"
            rel = f"{cls}/{i}.png"
            (root / "images" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "images" / rel)
            images[cls].append(rel)
        bank = {"alpha": ["round eye", "striped fin"], "beta": ["round eye", "striped fin"]}
        grounder = GroundedSAM(root / "images", str(root / "gd"), str(root / "sam"), box_threshold=0.0)
        spent = {"models": 0.0, "detect": 0.0, "embed": 0.0, "segment_boxes": 0.0}

        def timed(fn, part, keep=None):
            def run(*a):
                start = time.perf_counter()
                out = fn(*a)
                if keep is not None:
                    out = [boxes[:keep] for boxes in out]
                spent["models"] += time.perf_counter() - start
                spent[part] += time.perf_counter() - start
                return out
            return run

        grounder.detect = timed(grounder.detect, "detect", keep=args.boxes)
        grounder.embed = timed(grounder.embed, "embed")
        grounder.segment_boxes = timed(grounder.segment_boxes, "segment_boxes")
        start = time.perf_counter()
        grounder(images["alpha"][0], "alpha", ["alpha"])
        print(f"warm-up (1 prompt): {time.perf_counter() - start:.1f} s", flush=True)
        spent.update({k: 0.0 for k in spent})  # the warm-up above is not counted
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp)
        start = time.perf_counter()
        trainer.predict(MaskGeneration(grounder, bank, root / "store"), generation_loader(images, 2),
                        return_predictions=False)
        total = time.perf_counter() - start
    print(f"GroundingDINO (default config) + SAM (default config), random weights, {args.images} images 640x480, "
          f"3 prompts each, {args.boxes} boxes per prompt, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"images/s: {args.images / total:.3f}  ({total:.1f} s)")
    print(f"models: {spent['models']:.1f} s ({100 * spent['models'] / total:.1f} %), "
          f"ours: {total - spent['models']:.2f} s ({100 * (1 - spent['models'] / total):.2f} %)")
    print(f"  GroundingDINO (3 prompts, one batch): {spent['detect']:.1f} s, SAM image encoder (once per image): "
          f"{spent['embed']:.1f} s, SAM decoder (all boxes at once): {spent['segment_boxes']:.2f} s")


if __name__ == "__main__":
    main()
