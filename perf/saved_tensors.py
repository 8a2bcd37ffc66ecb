"""What one guided training step keeps for its backward, by phase: the forward trace, the rule backward, the loss.

    python perf/saved_tensors.py                                 # ViT-B/16, 224 px, batch 8, both AttnLRP settings
    python perf/saved_tensors.py --model vit_tiny_patch16_224 --second_order fused

Counts the distinct storages autograd saves (parameters excluded: they exist anyway), attributing each to the
phase that first saved it, via `torch.autograd.graph.saved_tensors_hooks`. This is the memory the step's
backward holds at its start, before the parameter gradients and the gradients in flight (perf/step_cost.py
measures the peak of all of it).
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from step_cost import build, make_batch, model_arguments  # this folder is on sys.path when the script runs

import cft_lightning.relevance.attn_lrp as attn_lrp


def saved_by_phase(model: str, size: int, batch_size: int, num_classes: int, second_order: str) -> dict[str, int]:
    module, _ = build({"fused": "cft_attnlrp", "autograd": "cft_attnlrp_autograd"}[second_order], model, size,
                      num_classes)
    batch = make_batch(batch_size, size, num_classes)
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    phase = ["forward"]
    seen: set[int] = set()
    sizes: collections.Counter[str] = collections.Counter()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            sizes[phase[0]] += t.untyped_storage().nbytes()
        return t

    trace_vit, rule_backward = attn_lrp.trace_vit, attn_lrp.rule_backward

    def traced(*args: Any, **kwargs: Any) -> Any:
        out = trace_vit(*args, **kwargs)
        phase[0] = "rule backward"
        return out

    def ruled(*args: Any, **kwargs: Any) -> Any:
        out = rule_backward(*args, **kwargs)
        phase[0] = "loss"
        return out

    attn_lrp.trace_vit, attn_lrp.rule_backward = traced, ruled
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.training_step(batch, 0)
    finally:
        attn_lrp.trace_vit, attn_lrp.rule_backward = trace_vit, rule_backward
    return dict(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_arguments(parser)
    parser.add_argument("--second_order", nargs="+", default=["fused", "autograd"], choices=["fused", "autograd"])
    args = parser.parse_args()
    print(f"{args.model} @ {args.size}px, batch {args.batch_size}: MiB kept for the backward (parameters excluded)")
    print(f"{'second_order':<14}{'forward':>10}{'rule bwd':>10}{'loss':>8}{'total':>8}")
    for setting in args.second_order:
        s = saved_by_phase(args.model, args.size, args.batch_size, args.num_classes, setting)
        mib = {k: v / 2**20 for k, v in s.items()}
        print(f"{setting:<14}{mib.get('forward', 0):>10.0f}{mib.get('rule backward', 0):>10.0f}"
              f"{mib.get('loss', 0):>8.0f}{sum(mib.values()):>8.0f}")


if __name__ == "__main__":
    main()
