"""Where CFT acts inside the demo's starting model: a measurement script for docs/demo.md (not a test).

    # per layer group, the norms of the alignment and consistency gradients on the few-shot images, and their cosine
    python benchmarks/demo_probe.py grads --seeds 0 1 2 3 4
    # per layer group, how far each method's fine-tuned weights moved from the start (||delta|| / ||start||)
    python benchmarks/demo_probe.py changes runs/demo5 --methods plain cft cft_frozen --seeds 0 1 2 3 4

Both read the starting models from the demo's cache (`cft demo --calibrate` builds them) with the demo's
default settings; `grads` uses the default few-shot selection (P = 3 images of every class).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from cft_lightning.benchmarks import build_shortcut_parts
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.demo.pipeline import DemoSettings
from cft_lightning.demo.start import build_start
from cft_lightning.models.backbone import build_backbone, resolve_data_config
from cft_lightning.regularizers import CFT
from cft_lightning.regularizers.base import consistency_loss
from cft_lightning.regularizers.cft import alignment_terms
from cft_lightning.relevance import AttnLRP


def group_of(name: str) -> str:
    """Layer group of a ViT parameter name: patch_embed, tokens (pos_embed, cls_token), block i, head (norm, head)."""
    if name.startswith("patch_embed"):
        return "patch_embed"
    if name in ("pos_embed", "cls_token", "reg_token"):
        return "tokens"
    match = re.match(r"blocks\.(\d+)\.", name)
    if match:
        return f"block {match.group(1)}"
    return "head"


def _grouped_norms(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    sums: dict[str, float] = {}
    for name, g in grads.items():
        sums[group_of(name)] = sums.get(group_of(name), 0.0) + float(g.square().sum())
    return {k: v ** 0.5 for k, v in sums.items()}


def grads(seeds: list[int]) -> None:
    settings = DemoSettings(progress=False)
    data = build_shortcut_parts(None, settings.benchmark, progress=False)
    reg = CFT()
    rows = []
    for seed in seeds:
        start = build_start(settings, data, seed, Path("/tmp") / f"demo_probe_seed_{seed}")
        model = build_backbone(settings.backbone(str(start.weights))).train()
        dm = GuidanceDataModule(str(data / "images" / "train"), masks=str(data / "masks"), mask_kinds=["concept"],
                                images_per_class=settings.images_per_class, class_fraction=settings.class_fraction,
                                seed=seed, data_config=resolve_data_config(model), batch_size=64)
        dm.setup("fit")
        batch = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=len(dm.train_dataset))))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        rel, grid, labels = reg.guided_pass(batch, model, AttnLRP(), "concept")
        concept, non = alignment_terms(rel.maps, grid)
        align = reg.align_weight * (reg.concept_weight * concept + reg.non_concept_weight * non)
        cls = reg.cls_weight * consistency_loss(rel.logits, "self", labels, None)
        g_align = dict(zip(params, torch.autograd.grad(align, list(params.values()), retain_graph=True,
                                                       allow_unused=True)))
        g_cls = dict(zip(params, torch.autograd.grad(cls, list(params.values()), allow_unused=True)))
        zero = {n: torch.zeros_like(p) for n, p in params.items()}
        g_align = {n: zero[n] if g is None else g for n, g in g_align.items()}
        g_cls = {n: zero[n] if g is None else g for n, g in g_cls.items()}
        flat_a = torch.cat([g.flatten() for g in g_align.values()])
        flat_c = torch.cat([g.flatten() for g in g_cls.values()])
        cosine = float(torch.nn.functional.cosine_similarity(flat_a, flat_c, dim=0))
        rows.append({"seed": seed, "align": _grouped_norms(g_align), "cls": _grouped_norms(g_cls), "cosine": cosine,
                     "L_concept": float(concept), "L_non_concept": float(non), "L_cls": float(cls / reg.cls_weight)})
    groups = list(rows[0]["align"])
    print("| layer group | alignment-gradient norm | consistency-gradient norm | ratio |")
    print("|---|---:|---:|---:|")
    for group in groups:
        a = [r["align"][group] for r in rows]
        c = [r["cls"][group] for r in rows]
        ratio = [x / max(y, 1e-12) for x, y in zip(a, c)]
        print(f"| {group} | {statistics.fmean(a):.3g} | {statistics.fmean(c):.3g} | {statistics.fmean(ratio):.3g} |")
    print(f"\ncosine(alignment gradient, consistency gradient), mean over seeds {seeds}: "
          f"{statistics.fmean(r['cosine'] for r in rows):+.3f}")
    print(json.dumps(rows, indent=1))


def changes(run: Path, methods: list[str], seeds: list[int]) -> None:
    table: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        start_path = json.loads((run / f"seed_{seed}" / "start.json").read_text())["weights"]
        start = torch.load(start_path, map_location="cpu", weights_only=True)
        for method in methods:
            tuned = torch.load(run / f"seed_{seed}" / method / "fine_tuned.pth", map_location="cpu", weights_only=True)
            delta: dict[str, float] = {}
            norm: dict[str, float] = {}
            for name, value in start.items():
                if not value.is_floating_point():
                    continue
                g = group_of(name)
                delta[g] = delta.get(g, 0.0) + float((tuned[name] - value).square().sum())
                norm[g] = norm.get(g, 0.0) + float(value.square().sum())
            for g in delta:
                table.setdefault(method, {}).setdefault(g, []).append((delta[g] / max(norm[g], 1e-30)) ** 0.5)
    groups = list(next(iter(table.values())))
    print("| method | " + " | ".join(groups) + " |")
    print("|---|" + "---:|" * len(groups))
    for method, per_group in table.items():
        print(f"| {method} | " + " | ".join(f"{100 * statistics.fmean(per_group[g]):.2f} %" for g in groups) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grads")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    c = sub.add_parser("changes")
    c.add_argument("run", type=Path)
    c.add_argument("--methods", nargs="+", required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    if args.command == "grads":
        grads(args.seeds)
    else:
        changes(args.run, args.methods, args.seeds)


if __name__ == "__main__":
    main()
