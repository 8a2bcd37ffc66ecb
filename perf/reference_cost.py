"""What skipping the frozen reference on training batches saves: a `GuidedFineTuner` training step (forward,
loss, backward, AdamW) with the reference tracked, once running it on every batch (`reference_train_metrics:
true`, the behaviour before 2026-11-23) and once not (the default now), timed round-robin in one process.

    python perf/reference_cost.py --repeats 4      # ViT-B/16, 224 px, batch 8, CPU, random weights
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_cost import FACTORIES, make_batch, step

from cft_lightning.models import BackboneSpec, GuidedFineTuner


def build(method: str, model: str, size: int, num_classes: int, with_reference: bool):
    torch.manual_seed(0)
    regularizer, relevance = FACTORIES[method]()
    spec = BackboneSpec(name=model, pretrained=False, num_classes=num_classes, model_kwargs={"img_size": size})
    module = GuidedFineTuner(spec, regularizer, relevance, lr=1e-6, reference_train_metrics=with_reference)
    module.train()
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Trainer attached
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    return module, module.configure_optimizers()["optimizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["plain", "cft_attnlrp", "cft_rollout"])
    args = parser.parse_args()
    batch = make_batch(args.batch_size, args.size, args.num_classes)
    runs = {(m, ref): build(m, args.model, args.size, args.num_classes, ref)
            for m in args.methods for ref in (True, False)}
    for key in runs:  # warm-up
        step(*runs[key], batch)
    times: dict[tuple[str, bool], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key in runs:
            times[key].append(step(*runs[key], batch))
    print(f"{args.model} @ {args.size}px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {args.repeats} timed steps each (median)")
    print(f"{'method':14s} {'with ref s':>10s} {'without s':>10s} {'saved':>7s}")
    for m in args.methods:
        with_ref, without = statistics.median(times[(m, True)]), statistics.median(times[(m, False)])
        print(f"{m:14s} {with_ref:10.2f} {without:10.2f} {100 * (1 - without / with_ref):6.1f}%")
    print("per-step times (s): " + "; ".join(
        f"{m}{'+ref' if ref else ''} " + " ".join(f"{t:.2f}" for t in ts) for (m, ref), ts in times.items()))


if __name__ == "__main__":
    main()
