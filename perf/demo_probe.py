"""Where CFT acts inside the demo's starting model: a measurement script for docs/demo.md (not a test).

    # per layer group, the norms of the alignment and consistency gradients on the few-shot images, and their cosine
    python perf/demo_probe.py grads --seeds 0 1 2 3 4
    # per layer group, how far each method's fine-tuned weights moved from the start (||delta|| / ||start||)
    python perf/demo_probe.py changes runs/demo5 --methods plain cft cft_frozen --seeds 0 1 2 3 4
    # does the CFT loss go down at all? the loss along its own gradient, and full-batch AdamW at several lrs
    python perf/demo_probe.py descent --seeds 0 --lrs 1e-4 1e-5 1e-6 --steps 100
    python perf/demo_probe.py descent --seeds 0 --lrs 1e-4 --frozen patch_embed pos_embed cls_token blocks.0

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


def _fewshot_and_heldout(settings: DemoSettings, data: Path, seed: int, model: torch.nn.Module
                         ) -> tuple[dict, dict]:
    """The seed's few-shot images (eval transform: a fixed full batch) and 96 OOD test images, with masks."""
    from cft_lightning.data.image_folder import GuidanceDataset, build_samples, scan_image_folder
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.data.transforms import build_transforms

    config = resolve_data_config(model)
    dm = GuidanceDataModule(str(data / "images" / "train"), masks=str(data / "masks"), mask_kinds=["concept"],
                            images_per_class=settings.images_per_class, class_fraction=settings.class_fraction,
                            seed=seed, data_config=config, batch_size=64)
    eval_tf = build_transforms(config)[1]
    store = MaskStore(data / "masks")
    root = data / "images" / "train"
    few = GuidanceDataset(root, build_samples(dm.selection.train, sorted(scan_image_folder(root)), None, str(root)),
                          eval_tf, store, ["concept"])
    ood_root = data / "images" / "test_ood"
    images = scan_image_folder(ood_root)
    held = GuidanceDataset(ood_root, build_samples(images, sorted(images), None, str(ood_root)), eval_tf, store,
                           ["concept"])
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:96].tolist()
    pick = torch.utils.data.Subset(held, sorted(order))

    def full(ds: torch.utils.data.Dataset) -> dict:
        return next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))

    return full(few), full(pick)


def _cft_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    reg = CFT()
    out = reg(batch, model, AttnLRP(), None)
    rel = out.relevance
    grid = torch.nn.functional.adaptive_avg_pool2d(batch["masks"]["concept"][:, None].float(),
                                                   tuple(rel.raw.shape[-2:]))[:, 0]
    pos = rel.raw.detach().clamp_min(0)
    share = float(((pos * grid).flatten(1).sum(1) / pos.flatten(1).sum(1).clamp_min(1e-30)).mean())
    acc = float((rel.logits.argmax(1) == batch["label"]).float().mean())
    phi = rel.maps.detach()
    bg = 1.0 - grid

    def wmean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)

    bg_mean = wmean(phi, bg)
    bg_std = wmean((phi - bg_mean[:, None, None]).square(), bg).sqrt()
    return out.total, {"loss": float(out.total.detach()), "concept": float(out.terms["concept"].detach()),
                       "non_concept": float(out.terms["non_concept"].detach()), "share": share, "acc": acc,
                       "phi_concept": float(wmean(phi, grid).mean()), "phi_bg": float(bg_mean.mean()),
                       "phi_bg_std": float(bg_std.mean()), "phi_mean": float(phi.mean()),
                       "neg_share": float((rel.raw.detach().clamp_max(0).abs().flatten(1).sum(1)
                                           / rel.raw.detach().abs().flatten(1).sum(1).clamp_min(1e-30)).mean()),
                       "near_min": float((phi < 0.05).float().mean())}


def descent(seeds: list[int], lrs: list[float], steps: int, frozen: list[str] | None = None) -> None:
    settings = DemoSettings(progress=False)
    data = build_shortcut_parts(None, settings.benchmark, progress=False)
    for seed in seeds:
        start = build_start(settings, data, seed, Path("/tmp") / f"demo_probe_seed_{seed}")
        model = build_backbone(settings.backbone(str(start.weights))).eval()
        few, held = _fewshot_and_heldout(settings, data, seed, model)
        for name, p in model.named_parameters():
            if any(name == f or name.startswith(f + ".") for f in frozen or []):
                p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        theta = [p.detach().clone() for p in params]
        loss, before = _cft_loss(model, few)
        grads = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        print(f"\nseed {seed}: {len(few['label'])} few-shot images; CFT loss {before['loss']:.4f}, "
              f"|grad| {float(norm):.3g}")
        print("| step t along -grad/|grad| | loss | first-order prediction |")
        print("|---:|---:|---:|")
        with torch.no_grad():
            for t in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1):
                for p, p0, g in zip(params, theta, grads):
                    p.copy_(p0 - t * g / norm)
                with torch.enable_grad():
                    value = _cft_loss(model, few)[1]["loss"]
                print(f"| {t:g} | {value:.4f} | {before['loss'] - t * float(norm):.4f} |")
            for p, p0 in zip(params, theta):
                p.copy_(p0)
        _, held_before = _cft_loss(model, held)
        print(f"\nfull-batch AdamW (weight decay 1e-4) on the few-shot images, {steps} steps; held-out: 96 OOD images")
        print("| lr | train loss: start -> min -> end | train concept share | train mean Phi concept / background "
              "| train mean Phi, cells with Phi < 0.05, negative share of |R| "
              "| held-out loss | held-out concept share | held-out top-1 | |Δθ| |")
        print("|---:|---|---|---|---|---|---|---|---:|")
        for lr in lrs:
            with torch.no_grad():
                for p, p0 in zip(params, theta):
                    p.copy_(p0)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
            trace = []
            for _ in range(steps):
                opt.zero_grad()
                loss, info = _cft_loss(model, few)
                loss.backward()
                opt.step()
                trace.append(info)
            _, after = _cft_loss(model, few)
            _, held_after = _cft_loss(model, held)
            moved = float(torch.sqrt(sum((p.detach() - p0).square().sum() for p, p0 in zip(params, theta))))
            losses = [t["loss"] for t in trace] + [after["loss"]]
            print(f"| {lr:g} | {before['loss']:.3f} -> {min(losses):.3f} -> {after['loss']:.3f} | "
                  f"{100 * before['share']:.1f} -> {100 * after['share']:.1f} | "
                  f"{before['phi_concept']:.2f} / {before['phi_bg']:.2f} -> {after['phi_concept']:.2f} / "
                  f"{after['phi_bg']:.2f} | {before['phi_mean']:.2f}, {100 * before['near_min']:.1f} %, "
                  f"{100 * before['neg_share']:.1f} % -> {after['phi_mean']:.2f}, {100 * after['near_min']:.1f} %, "
                  f"{100 * after['neg_share']:.1f} % | "
                  f"{held_before['loss']:.3f} -> {held_after['loss']:.3f} | "
                  f"{100 * held_before['share']:.1f} -> {100 * held_after['share']:.1f} | "
                  f"{100 * held_before['acc']:.1f} -> {100 * held_after['acc']:.1f} | {moved:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grads")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    c = sub.add_parser("changes")
    c.add_argument("run", type=Path)
    c.add_argument("--methods", nargs="+", required=True)
    c.add_argument("--seeds", type=int, nargs="+", default=[0])
    d = sub.add_parser("descent")
    d.add_argument("--seeds", type=int, nargs="+", default=[0])
    d.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-5, 1e-6])
    d.add_argument("--steps", type=int, default=100)
    d.add_argument("--frozen", nargs="*", default=[], help="parameter prefixes kept fixed (e.g. patch_embed pos_embed "
                   "cls_token blocks.0)")
    args = parser.parse_args()
    if args.command == "grads":
        grads(args.seeds)
    elif args.command == "descent":
        descent(args.seeds, args.lrs, args.steps, args.frozen)
    else:
        changes(args.run, args.methods, args.seeds)


if __name__ == "__main__":
    main()
