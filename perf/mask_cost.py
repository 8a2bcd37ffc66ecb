"""Throughput of `cft masks generate`, and where its time goes: the two models, their processors, our own code.

    python perf/mask_cost.py                             # full-size models, both SAM backends (2 CPU cores: ~4 min)
    python perf/mask_cost.py --size tiny --images 8      # tiny models: what our own code costs per image
    python perf/mask_cost.py --json out.json             # the figures as JSON as well

GroundingDINO (transformers' default config: Swin-T backbone, BERT-base text encoder, random weights) and SAM
ViT-B in both backends: segment-anything's `sam_model_registry["vit_b"]` saved as an official-format `.pth` and
loaded through `--segmenter vit_b:FILE`, and transformers' `SamModel` folder holding the same weights (see
`save_sams`). No checkpoint can be downloaded here; a forward's cost depends on the architecture and the input
size, not on the weights, as long as the activations stay normal floats (see `save_sams` for the one case where
random weights broke that). The boxes do depend on the weights, so the detector's output is pinned to `--boxes`
queries per prompt above the thresholds (the rest pushed below), which also keeps the detector's post-processing
at a trained detector's few boxes. Generated 640x480 JPEG images, 2 concepts per class plus the class prompt, one
uncounted warm-up image (on which the FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode`), then
`--images` images through a 1-device `Trainer.predict` exactly as `cft masks generate` runs it.

Time buckets (disjoint; they sum to the total):
  detector processor  GroundingDinoProcessor (library): image resize/normalise, tokenise, box post-processing
  detector forward    GroundingDinoForObjectDetection.forward (library model)
  SAM processor       (library) transformers: SamProcessor resize/normalise/pad and post_process_masks;
                      segment-anything: ResizeLongestSide, Sam.preprocess, Sam.postprocess_masks
  SAM encode          the image encoder, once per image (library model)
  SAM decode          prompt encoder + mask decoder, all boxes of all prompts in one call (library model)
  ours: image load    `load_image` (PIL decode, RGB)
  ours: mask writes   `MaskStore.write`: binarise, PNG encode, atomic write (4 masks per image)
  ours: other         the rest of `predict_step`: mask unions, the JSONL log, our glue between the calls (and
                      the few library lines between the timed calls, e.g. SamPredictor's thresholding)
  Lightning           `Trainer.predict` outside `predict_step`: setup, the loop, teardown (mostly once per run)
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image

BUCKETS = {
    "detector_processor": "detector processor", "detector_forward": "detector forward",
    "sam_processor": "SAM processor", "sam_encode": "SAM encode", "sam_decode": "SAM decode",
    "ours_load": "ours: image load", "ours_write": "ours: mask writes", "ours_other": "ours: other",
    "lightning": "Lightning",
}
MODELS = ("detector_forward", "sam_encode", "sam_decode")
PROCESSORS = ("detector_processor", "sam_processor")
OURS = ("ours_load", "ours_write", "ours_other", "lightning")
BACKENDS = ("transformers", "segment-anything")
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "round", "eye", "striped", "fin", "alpha", "beta"]
BANK = {"alpha": ["round eye", "striped fin"], "beta": ["round eye", "striped fin"]}
# example GPU for the estimate: A100 dense peak (NVIDIA's data sheet), and an assumed utilisation
GPU_PEAKS = {"A100 bf16": 312e12, "A100 tf32": 156e12, "A100 fp32 (no TF32)": 19.5e12}
UTILISATION = 0.3


# ------------------------------------------------------------------------------------------------ models
def save_detector(folder: Path, size: str) -> None:
    """GroundingDINO (default config, or the tests' tiny one) and its PIL processor, random weights, in `folder`."""
    if size != "full":
        _tests_on_path()
        from _sam_helpers import save_tiny_detector

        save_tiny_detector(folder, words=WORDS)
        return
    from transformers import BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection, GroundingDinoProcessor
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(), tokenizer=tokenizer)
    processor.save_pretrained(folder)


def _tests_on_path() -> None:
    """The tests' tiny-model builders (tests/_sam_helpers.py) are shared with this script."""
    import sys

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def save_sams(root: Path, size: str) -> tuple[str, Any]:
    """One random SAM in both backends' forms: segment-anything's `Sam` (full: `sam_model_registry["vit_b"]`,
    saved as an official-format state dict and named `vit_b:FILE` as a user would; tiny: no registry variant, so
    a backend object) and the same weights renamed into a transformers `SamModel` folder (the tests' one-to-one
    renaming, checked by tests/test_sam_backends.py). Both backends run the same weights, and at PyTorch's default
    init: transformers' own SAM init makes activations so small (1e-8 after the patch embedding, subnormal floats
    in the attention) that its image encoder took 62 s instead of 6 s per image on this CPU, a cost of the
    weights that a trained SAM does not have. Returns (transformers folder, segment-anything segmenter)."""
    from segment_anything import sam_model_registry
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from cft_lightning.masks.sam_backends import SegmentAnythingSAM

    _tests_on_path()
    from _sam_helpers import save_tiny_transformers_sam, tiny_segment_anything, to_transformers

    folder = root / f"sam_{size}"
    if size == "tiny":
        sam = tiny_segment_anything()
        save_tiny_transformers_sam(folder, to_transformers(sam.state_dict()), decoder_eps=1e-5)
        return str(folder), SegmentAnythingSAM(sam)
    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    torch.save(state, root / "sam_vit_b_random.pth")
    model = SamModel(SamConfig(mask_decoder_config=dict(layer_norm_eps=1e-5)))  # segment-anything's decoder eps
    model.load_state_dict(to_transformers(state), strict=True)
    model.save_pretrained(folder)
    SamProcessor(image_processor=SamImageProcessorPil()).save_pretrained(folder)
    return str(folder), f"vit_b:{root / 'sam_vit_b_random.pth'}"


def write_images(root: Path, count: int) -> dict[str, list[str]]:
    """`count` smooth random 640x480 JPEGs (ImageNet-like sizes and file sizes), alternating two classes, plus an
    uncounted `alpha/warmup.jpg`."""
    rng = np.random.default_rng(0)
    images: dict[str, list[str]] = {"alpha": [], "beta": []}
    for i in range(count + 1):
        cls = "alpha" if i % 2 == 0 else "beta"
        rel = f"{cls}/{i}.jpg" if i < count else "alpha/warmup.jpg"
        coarse = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)).resize((640, 480),
                                                                                           Image.BICUBIC)
        noisy = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (480, 640, 3)), 0, 255)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.astype(np.uint8)).save(root / rel, quality=90)
        if i < count:
            images[cls].append(rel)
    return images


# ------------------------------------------------------------------------------------------------ timing
def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)  # shapes: FlopCounterMode passes shapes, not tensors


# the CPU kernel of scaled_dot_product_attention has no FLOP formula in torch (its CUDA kernels have): without
# this the attention of the transformers SAM (and of any model on sdpa) would not be counted
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class Clock:
    """Seconds per bucket of disjoint timed calls (a call made inside a timed call counts to the outer one only),
    and, while `count_flops` is on, the FLOPs of the model buckets."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.calls = dict.fromkeys(BUCKETS, 0)
        self.flops = dict.fromkeys(MODELS, 0)
        self.count_flops = False
        self._busy = False

    def reset(self) -> None:
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.calls = dict.fromkeys(BUCKETS, 0)

    def call(self, bucket: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._busy:
            return fn(*args, **kwargs)
        from torch.utils.flop_counter import FlopCounterMode

        counter = (FlopCounterMode(display=False, custom_mapping=CPU_SDPA)
                   if self.count_flops and bucket in MODELS else None)
        self._busy = True
        try:
            start = time.perf_counter()
            with counter if counter is not None else nullcontext():
                out = fn(*args, **kwargs)
            self.seconds[bucket] += time.perf_counter() - start
            self.calls[bucket] += 1
        finally:
            self._busy = False
        if counter is not None:
            self.flops[bucket] += counter.get_total_flops()
        return out

    def patch(self, obj: Any, name: str, bucket: str) -> None:
        """Time `obj.name(...)` (an instance attribute shadowing the method; `nn.Module.__call__` finds it)."""
        setattr(obj, name, partial(self.call, bucket, getattr(obj, name)))


class Timed:
    """A proxy: every call made through it (itself, its methods, its sub-objects' methods) counts to `bucket`."""

    def __init__(self, target: Any, clock: Clock, bucket: str) -> None:
        self._target, self._clock, self._bucket = target, clock, bucket

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._clock.call(self._bucket, self._target, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if isinstance(value, (int, float, str, bool, type(None), dict, list, tuple, torch.Tensor)):
            return value
        return Timed(value, self._clock, self._bucket)


def pin_boxes(logits: torch.Tensor, keep: int) -> torch.Tensor:
    """GroundingDINO logits (B, queries, tokens) with each prompt's `keep` best queries scored sigmoid(5) and the
    others sigmoid(-100): what a trained detector gives for an image with `keep` matching objects."""
    score = logits.amax(-1)
    top = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(keep, dim=1).indices, True)
    return torch.where(top[..., None], logits - score[..., None] + 5.0, torch.full_like(logits, -100.0))


def instrument(grounder: Any, clock: Clock, boxes: int) -> None:
    """Route the grounder's library calls through `clock` (see the bucket table in the module docstring)."""
    grounder.det_processor = Timed(grounder.det_processor, clock, "detector_processor")
    forward = grounder.detector.forward

    def detector_forward(*args: Any, **kwargs: Any) -> Any:
        out = clock.call("detector_forward", forward, *args, **kwargs)
        out["logits"] = pin_boxes(out["logits"], boxes)  # ModelOutput: sets the attribute too
        return out

    grounder.detector.forward = detector_forward
    seg = grounder.segmenter
    if hasattr(seg, "predictor"):  # segment-anything
        model = seg.predictor.model
        seg.predictor.transform = Timed(seg.predictor.transform, clock, "sam_processor")
        for obj, name, bucket in [(model, "preprocess", "sam_processor"), (model, "postprocess_masks", "sam_processor"),
                                  (model.image_encoder, "forward", "sam_encode"),
                                  (model.prompt_encoder, "forward", "sam_decode"),
                                  (model.prompt_encoder, "get_dense_pe", "sam_decode"),
                                  (model.mask_decoder, "forward", "sam_decode")]:
            clock.patch(obj, name, bucket)
    else:  # transformers
        seg.processor = Timed(seg.processor, clock, "sam_processor")
        clock.patch(seg.model, "get_image_embeddings", "sam_encode")
        clock.patch(seg.model, "forward", "sam_decode")


@contextmanager
def timing_our_io(clock: Clock) -> Iterator[None]:
    """Time image loading and mask writes (module attributes patched for the run, then restored)."""
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.masks import grounded_sam

    load, write = grounded_sam.load_image, MaskStore.write
    grounded_sam.load_image = partial(clock.call, "ours_load", load)
    MaskStore.write = lambda self, *a, **k: clock.call("ours_write", write, self, *a, **k)
    try:
        yield
    finally:
        grounded_sam.load_image, MaskStore.write = load, write


# ------------------------------------------------------------------------------------------------ runs
def measure(root: Path, size: str, backend: str, images: int, boxes: int = 2) -> dict[str, Any]:
    """Seconds per image of `cft masks generate`'s predict loop with `backend`'s SAM and the time per bucket,
    after one uncounted warm-up image on which the models' FLOPs are counted. Models are built under `root`."""
    from cft_lightning.masks.grounded_sam import GroundedSAM
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    if not (root / "gd").is_dir():
        save_detector(root / "gd", size)
    folder, segment_anything = save_sams(root, size)
    segmenter = folder if backend == "transformers" else segment_anything
    listing = write_images(root / "images", images)
    grounder = GroundedSAM(root / "images", str(root / "gd"), segmenter)
    clock = Clock()
    instrument(grounder, clock, boxes)
    store = root / f"store_{backend}"
    with timing_our_io(clock):
        clock.count_flops = True
        grounder("alpha/warmup.jpg", "alpha", [*BANK["alpha"], "alpha"])
        clock.count_flops = False
        clock.reset()
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root)
        module, inside = MaskGeneration(grounder, BANK, store), [0.0]
        step = module.predict_step

        def timed_step(*args: Any) -> Any:
            begin = time.perf_counter()
            out = step(*args)
            inside[0] += time.perf_counter() - begin
            return out

        module.predict_step = timed_step
        start = time.perf_counter()
        trainer.predict(module, generation_loader(listing, 2), return_predictions=False)
        total = time.perf_counter() - start
    seconds = dict(clock.seconds)
    seconds["lightning"] = total - inside[0]
    seconds["ours_other"] = inside[0] - sum(v for k, v in seconds.items() if k not in ("ours_other", "lightning"))
    del grounder, trainer, module
    gc.collect()
    return {"backend": backend, "size": size, "images": images, "boxes_per_prompt": boxes, "prompts_per_image": 3,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "total_s": total,
            "per_image_s": total / images, "seconds": seconds, "calls": dict(clock.calls),
            "flops_per_image": dict(clock.flops), "store": str(store)}


def shares(result: dict[str, Any]) -> dict[str, float]:
    """Fractions of the total in the models, the (library) processors, and our own code."""
    total, s = result["total_s"], result["seconds"]
    return {group: sum(s[k] for k in keys) / total
            for group, keys in (("models", MODELS), ("processors", PROCESSORS), ("ours", OURS))}


def gpu_estimate(result: dict[str, Any], peak: float, utilisation: float = UTILISATION) -> float:
    """ESTIMATED seconds per 1,000 images on a GPU: the measured FLOPs per image at `utilisation` of `peak`, plus
    the processors and our own code per image at the speed measured here (host-side work that a GPU does not
    speed up), plus Lightning's time once (it is nearly all per run, not per image)."""
    s = result["seconds"]
    host = sum(s[k] for k in (*PROCESSORS, *OURS) if k != "lightning") / result["images"]
    return 1000 * (sum(result["flops_per_image"].values()) / (peak * utilisation) + host) + s["lightning"]


def report(result: dict[str, Any]) -> str:
    """The human-readable table of one `measure` result."""
    n, total = result["images"], result["total_s"]
    lines = [f"{result['size']} GroundingDINO + {result['backend']} SAM, random weights, {n} image(s) 640x480 after "
             f"1 warm-up, 3 prompts, {result['boxes_per_prompt']} boxes per prompt, {result['threads']} threads, "
             f"torch {result['torch']}",
             f"seconds per image: {total / n:.3f}  ({n / total:.4f} images/s, {total:.2f} s in all)",
             f"{'bucket':<20}{'s/image':>10}{'share':>9}"]
    for key, label in BUCKETS.items():
        lines.append(f"{label:<20}{result['seconds'][key] / n:>10.4f}{100 * result['seconds'][key] / total:>8.2f}%")
    sh = shares(result)
    lines.append(f"models {100 * sh['models']:.2f} %, processors (library) {100 * sh['processors']:.2f} %, "
                 f"ours {100 * sh['ours']:.2f} % (target <= 10 %)")
    f = result["flops_per_image"]
    lines.append(f"FLOPs per image (FlopCounterMode, measured): detector {f['detector_forward'] / 1e9:.1f} G (3 "
                 f"prompts), SAM encode {f['sam_encode'] / 1e9:.1f} G, SAM decode {f['sam_decode'] / 1e9:.2f} G")
    host = gpu_estimate(result, float("inf"))
    lines.append(f"host-side work (processors, ours) per 1,000 images at this CPU's speed: {host:.0f} s")
    for gpu, peak in GPU_PEAKS.items():
        total_gpu = gpu_estimate(result, peak)
        lines.append(f"ESTIMATE {gpu} at {100 * UTILISATION:.0f} % of {peak / 1e12:g} TFLOP/s: models "
                     f"{total_gpu - host:.0f} s + host-side {host:.0f} s = {total_gpu / 60:.1f} min per 1,000 images")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=["full", "tiny"], default="full")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--images", type=int, default=2, help="timed images per backend (after one warm-up)")
    parser.add_argument("--boxes", type=int, default=2, help="boxes per prompt (pinned: random weights)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            results.append(measure(Path(tmp), args.size, backend, args.images, args.boxes))
            print(report(results[-1]), "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
