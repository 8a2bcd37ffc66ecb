"""Cost of the non-finite-gradient check run before every optimizer step, on ViT-B/16's gradients (CPU):
the former loop (one `isfinite(grad).all()` and host sync per parameter) against the fused total norm with
one sync that `GuidedFineTuner.on_before_optimizer_step` uses now.

    python perf/grad_check_cost.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model = timm.create_model(args.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)

    def per_parameter() -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())

    def fused() -> bool:
        return bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))

    times: dict[str, list[float]] = {"per-parameter loop": [], "fused total norm": []}
    for _ in range(args.repeats):
        for name, check in (("per-parameter loop", per_parameter), ("fused total norm", fused)):
            start = time.perf_counter()
            assert check()
            times[name].append(time.perf_counter() - start)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {len(list(model.parameters()))} gradient tensors, {n / 1e6:.1f} M values, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, ts in times.items():
        print(f"{name:20s} median {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    main()
