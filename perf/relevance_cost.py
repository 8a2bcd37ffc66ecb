"""Cost of explaining with each relevance method: time and peak memory per image (forward + relevance).

    python perf/relevance_cost.py                              # ViT-B/16, 224 px, batch 8, CPU
    python perf/relevance_cost.py --model convnextv2_base --methods gradcam ixg grad_x_act lrp

Each method explains the same random batch with `differentiable=False` (what `cft explain` and `cft test`
do), timed round-robin in one process after a warm-up call, median over repeats, divided by the batch size.
Peak memory: `ru_maxrss` of a fresh subprocess per method, minus its resident size before the call. The
training-step cost of the differentiable methods inside CFT is `perf/step_cost.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import timm
import torch

from cft_lightning.relevance import create_relevance


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    try:  # ViTs take the image size; CNNs do not need (or accept) it
        model = timm.create_model(args.model, pretrained=False, num_classes=1000, img_size=args.size)
    except TypeError:
        model = timm.create_model(args.model, pretrained=False, num_classes=1000)
    model.eval()
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    return model, images


def _explain(method_name: str, model: torch.nn.Module, images: torch.Tensor) -> float:
    method = create_relevance(method_name)  # a registered name (what `cft explain --method` takes)
    start = time.perf_counter()
    method(model, images, None, differentiable=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["attnlrp", "cp_lrp", "rollout", "gradcam", "iia",
                                                          "input_grad", "ixg", "grad_x_act"])
    parser.add_argument("--memory_of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        model, images = _setup(args)
        one = images[:1]
        _explain(args.memory_of, model, one)  # warm-up on one image
        before = _rss_mib()
        _explain(args.memory_of, model, images)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"mib": peak - before}))
        return
    memory = {}
    for name in args.methods:
        cmd = [sys.executable, __file__, "--memory_of", name, "--model", args.model, "--size", str(args.size),
               "--batch_size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])["mib"]
    model, images = _setup(args)
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for name in args.methods:
        _explain(name, model, images)  # warm-up
    for _ in range(args.repeats):
        for name in args.methods:
            times[name].append(_explain(name, model, images))
    start = time.perf_counter()
    with torch.inference_mode():
        model(images)
    forward = time.perf_counter() - start
    b = args.batch_size
    print(f"{args.model} @ {args.size}px, batch {b}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.repeats} timed calls each (median)")
    print(f"{'method':<12}{'s / image':>11}{'x forward':>11}{'MiB / batch':>13}")
    for name in args.methods:
        t = statistics.median(times[name])
        print(f"{name:<12}{t / b:>11.3f}{t / forward:>11.1f}{memory[name]:>13.0f}")
    print(f"plain forward (inference mode): {forward / b:.3f} s / image")


if __name__ == "__main__":
    main()
