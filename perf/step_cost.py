"""Cost of one training step of every method relative to plain fine-tuning.

    python perf/step_cost.py                       # ViT-B/16, 224 px, batch 8, CPU, random weights
    python perf/step_cost.py --model vit_tiny_patch16_224 --repeats 5
    python perf/step_cost.py --methods plain rrr gradmask   # a subset (plain is always included)

A step is what `GuidedFineTuner.training_step` does plus the backward pass and the AdamW update. The
methods are timed round-robin in one process (so machine noise hits them alike), and the median is
reported with its ratio to the plain step. Peak memory is measured per method in a fresh subprocess
(`ru_maxrss` during one step minus the resident size before it, after a one-image warm-up step), since a
process's peak never goes down.
The frozen reference is off (`track_reference: false`): its one inference-mode forward is the same for
every method and is timed on its own line.
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
from collections.abc import Callable
from typing import Any

import torch

from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import CFT, RRDA, RRR, GradMask, LVLMCritic, PlainFineTuning, Regularizer, RobustViT
from cft_lightning.relevance import AttnLRP, GradCAM, GradientRollout, InputXGradient, RelevanceMethod

# name -> (regularizer, relevance) factory; the loss weights do not change the cost.
FACTORIES: dict[str, Callable[[], tuple[Regularizer, RelevanceMethod | None]]] = {
    "plain": lambda: (PlainFineTuning(), None),
    "cft_attnlrp": lambda: (CFT(), AttnLRP()),  # second_order="fused", the default
    "cft_attnlrp_autograd": lambda: (CFT(), AttnLRP(second_order="autograd")),
    "cft_rollout": lambda: (CFT(), GradientRollout()),
    "cft_gradcam": lambda: (CFT(), GradCAM()),
    "cft_ixg": lambda: (CFT(), InputXGradient()),
    "rrr": lambda: (RRR(), None),
    "gradmask": lambda: (GradMask(), None),
    "rrda": lambda: (RRDA(), None),
    "robust_vit": lambda: (RobustViT(), GradientRollout()),
    "lvlm_va": lambda: (LVLMCritic(), None),
}
METHODS = tuple(FACTORIES)


def build(method: str, model: str, size: int, num_classes: int) -> tuple[GuidedFineTuner, torch.optim.Optimizer]:
    spec = BackboneSpec(name=model, pretrained=False, num_classes=num_classes, model_kwargs={"img_size": size})
    if method not in FACTORIES:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    regularizer, relevance = FACTORIES[method]()
    module = GuidedFineTuner(spec, regularizer, relevance, lr=1e-6, track_reference=False)
    module.train()
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer attached
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    optimizer = module.configure_optimizers()["optimizer"]
    return module, optimizer


def make_batch(batch_size: int, size: int, num_classes: int, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch_size, size, size)
    masks[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=g),
        "label": torch.randint(0, num_classes, (batch_size,), generator=g),
        # every method reads its own kind; the same square serves as concept, object and critic mask
        "masks": {"concept": masks, "object": masks, "critic": 1.0 - masks},
        "path": [f"synthetic_{i}.png" for i in range(batch_size)],
    }


def step(module: GuidedFineTuner, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def measure_memory(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Peak resident memory added by one step (run in a fresh process)."""
    module, optimizer = build(method, args.model, args.size, args.num_classes)
    batch = make_batch(args.batch_size, args.size, args.num_classes)
    # Warm up on a single image: pages in the code paths and creates the optimizer state, so the measured
    # peak is the batch's activations, gradients and rule backward (the warm-up's own peak is far smaller).
    step(module, optimizer, {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
         | {"masks": {k: v[:1] for k, v in batch["masks"].items()}})
    before = _rss_kib()
    step(module, optimizer, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"before_mib": before / 1024, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The step's model and batch: ViT-B/16 at 224 px, batch 8, 1000 classes unless told otherwise."""
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_classes", type=int, default=1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method (after one warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to time (plain is always timed: it is the unit)")
    parser.add_argument("--glibc_heap", action="store_true",
                        help="measure memory with glibc's default allocation thresholds (counts freed memory the "
                             "heap keeps; the figures before 2026-12-01)")
    parser.add_argument("--memory_of", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = ["plain", *[m for m in args.methods if m != "plain"]]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return

    # Memory first, in fresh subprocesses, while this process is still small.
    memory = {}
    for m in methods:
        cmd = [sys.executable, __file__, "--memory_of", m, "--model", args.model, "--size", str(args.size),
               "--batch_size", str(args.batch_size), "--num_classes", str(args.num_classes),
               "--threads", str(args.threads)]
        # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so the resident size
        # would count memory the step already freed; a fixed threshold returns every large block on free,
        # and the peak resident size follows the live tensors (like a GPU's max_memory_allocated).
        env = os.environ | ({} if args.glibc_heap else {"MALLOC_MMAP_THRESHOLD_": "131072"})
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        memory[m] = json.loads(out.strip().splitlines()[-1])

    torch.manual_seed(0)
    batch = make_batch(args.batch_size, args.size, args.num_classes)
    built = {m: build(m, args.model, args.size, args.num_classes) for m in methods}
    reference = built["plain"][0].backbone
    times: dict[str, list[float]] = {m: [] for m in methods}
    ref_times: list[float] = []
    for m in methods:  # warm-up
        step(*built[m], batch)
    for _ in range(args.repeats):
        for m in methods:
            times[m].append(step(*built[m], batch))
        start = time.perf_counter()
        with torch.inference_mode():
            reference.eval()(batch["image"])
        reference.train()
        ref_times.append(time.perf_counter() - start)

    plain_t = statistics.median(times["plain"])
    plain_m = memory["plain"]["step_mib"]
    print(f"{args.model} @ {args.size}px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.repeats} timed steps each (median and fastest)")
    plain_min = min(times["plain"])
    print(f"{'method':<14}{'step s':>9}{'x plain':>9}{'min s':>8}{'x plain':>9}{'step MiB':>10}{'x plain':>9}")
    for m in methods:
        t, fastest = statistics.median(times[m]), min(times[m])
        mem = memory[m]["step_mib"]
        print(f"{m:<14}{t:>9.2f}{t / plain_t:>9.2f}{fastest:>8.2f}{fastest / plain_min:>9.2f}"
              f"{mem:>10.0f}{mem / plain_m:>9.2f}")
    print("per-step times (s): " + "; ".join(f"{m} " + " ".join(f"{t:.2f}" for t in times[m]) for m in methods))
    print(f"reference forward (inference mode): {statistics.median(ref_times):.2f} s "
          f"= {statistics.median(ref_times) / plain_t:.2f} x plain step")


if __name__ == "__main__":
    main()
