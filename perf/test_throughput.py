"""Images per second of `cft test` (Original and fine-tuned in one pass, the Evaluator, the benchmark's
scoring) against a plain timm inference loop over the same images, in one process.

    python perf/test_throughput.py                           # ViT-B/16, 400 generated 256x256 JPEGs
    python perf/test_throughput.py --model vit_tiny_patch16_224 --images 200

The images are written once as a fake ImageNet-A tree (200 WNID folders). Both sides read them with the
same number of DataLoader workers and the model's eval transform, under inference mode; `cft test` runs two
models (the reference and the fine-tuned one), so the fair baseline is two timm forwards per batch. The two
are timed alternately, `--repeats` times each (median).
"""

from __future__ import annotations

import argparse
import pkgutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import timm
import torch
from PIL import Image

from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import PlainFineTuning


def make_tree(root: Path, count: int) -> Path:
    wnids = pkgutil.get_data("timm.data", "_info/imagenet_a_synsets.txt").decode().split()
    rng = np.random.default_rng(0)
    for i in range(count):
        path = root / "imagenet-a" / wnids[i % len(wnids)] / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
    (root / "train" / wnids[0]).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(root / "train" / wnids[0] / "t.jpg")
    return root


def run_cft(module: GuidedFineTuner, root: Path, args: argparse.Namespace) -> float:
    dm = GuidanceDataModule(str(root / "train"), mask_kinds=[], classes="imagenet", eval_batch_size=args.batch_size,
                            num_workers=args.workers, benchmarks={"in_a": str(root / "imagenet-a")},
                            benchmark_names="in_a")
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root / "out"), inference_mode=True)
    start = time.perf_counter()
    trainer.test(module, dm, verbose=False)
    return time.perf_counter() - start


def run_timm(models: list[torch.nn.Module], root: Path, args: argparse.Namespace) -> float:
    config = timm.data.resolve_data_config({}, model=models[0])
    dataset = timm.data.create_dataset("", root=str(root / "imagenet-a"), transform=timm.data.create_transform(
        **config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            for m in models:
                m(x).argmax(1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp), args.images)
        torch.manual_seed(0)
        module = GuidedFineTuner(BackboneSpec(args.model, pretrained=False), PlainFineTuning(), None, lr=1e-6)
        models = [module.backbone.eval(), module.reference]
        cft, plain = [], []
        run_timm(models, root, args)  # warm-up (file cache, kernels)
        for _ in range(args.repeats):
            cft.append(run_cft(module, root, args))
            plain.append(run_timm(models, root, args))
    c, p = statistics.median(cft), statistics.median(plain)
    print(f"{args.model}, {args.images} images, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"cft test (2 models):   {args.images / c:7.1f} images/s  ({' '.join(f'{t:.1f}' for t in cft)} s)")
    print(f"timm loop (2 models):  {args.images / p:7.1f} images/s  ({' '.join(f'{t:.1f}' for t in plain)} s)")
    print(f"overhead of cft test: {100 * (c / p - 1):+.1f} %")


if __name__ == "__main__":
    main()
