"""`cft demo`: the embedded end-to-end run on CPU (no GPU, no ImageNet, no internet).

    cft demo                                    # one seed, plain / object-mask / CFT fine-tuning
    cft demo --seeds 0 1 2 --out runs/demo3     # the figures in docs/demo.md
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cft_lightning.benchmarks.shortcut_parts import ShortcutPartsSpec
from cft_lightning.demo.settings import METHOD_GROUPS, METHOD_NAMES, DemoSettings, method_syntax

__all__ = ["DemoSettings", "collect", "main", "run_demo"]


def __getattr__(name: str) -> Any:
    """`collect` and `run_demo` import torch and Lightning: loaded on first use, so `cft demo --help` is instant."""
    if name in ("collect", "run_demo"):
        return getattr(importlib.import_module("cft_lightning.demo.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    b = ShortcutPartsSpec()
    p = argparse.ArgumentParser(
        prog="cft demo",
        description="Does guided fine-tuning repair a shortcut? A starting model that knows the parts but leans on "
        "the background, fine-tuned by each method and tested with the decision-reliance diagnostics, on CPU "
        "(docs/demo.md).")
    p.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds,
                   help="seeds to run; each has its own starting model and few-shot draw (default: %(default)s)")
    groups = "; ".join(f"{name} = {' '.join(members)}" for name, members in METHOD_GROUPS.items())
    p.add_argument("--methods", nargs="+", default=d.methods, metavar="METHOD",
                   help=f"fine-tuning methods compared on the same starting model (default: %(default)s): "
                   f"{', '.join(sorted(METHOD_NAMES))}; or a group: {groups}; or {method_syntax()}, e.g. cft+ixg "
                   "or my_pkg.mod.MyReg (docs/demo.md, docs/extending.md)")
    p.add_argument("--spurious_rate", type=float, default=b.spurious_rate,
                   help="share of train/val/ID-test images on their class's background (default: %(default)s)")
    p.add_argument("--decoy", action="store_true", help="also draw a class-coloured decoy square")
    p.add_argument("--decoy_only", action="store_true",
                   help="DecoyMNIST-style: the decoy alone carries the class (backgrounds at random)")
    p.add_argument("--decoy_side", type=int, default=None,
                   help="decoy square side in pixels (default: image_size // 6 with --decoy_only, where the "
                   "pretrained ViT does not pick up a smaller one; image_size // 12 otherwise)")
    p.add_argument("--critic", default=d.critic, choices=["oracle_mask", "pipeline"],
                   help="lvlm_va's corrective masks: the background mask (oracle_mask), or the critique stage "
                   "with the oracle critic on the decoy masks (pipeline) (default: %(default)s)")
    p.add_argument("--num_classes", type=int, default=b.num_classes,
                   help="benchmark classes, 2-10 (default: %(default)s)")
    p.add_argument("--image_size", type=int, default=b.image_size, help="image side in pixels (default: %(default)s)")
    p.add_argument("--train_per_class", type=int, default=b.train_per_class,
                   help="training images per class (default: %(default)s)")
    p.add_argument("--test_per_class", type=int, default=b.test_per_class,
                   help="images per class in each test split (default: %(default)s)")
    p.add_argument("--start", default=d.start, choices=["pretrained", "scratch"],
                   help="the starting model: 'pretrained' learns the parts on upstream images with uninformative "
                   "backgrounds, then the biased split (the paper's regime); 'scratch' only the biased split "
                   "(default: %(default)s)")
    p.add_argument("--pretrain_epochs", type=int, default=d.pretrain_epochs,
                   help="stage 1 of the pretrained start (parts) (default: %(default)s)")
    p.add_argument("--scratch_epochs", type=int, default=d.scratch_epochs,
                   help="the one stage of the scratch start (default: %(default)s)")
    p.add_argument("--pretrain_lr", type=float, default=d.pretrain_lr,
                   help="learning rate of stage 1 and of the scratch start (default: %(default)s)")
    p.add_argument("--shortcut_epochs", type=int, default=d.shortcut_epochs,
                   help="stage 2 of the pretrained start, on the biased split (default: %(default)s)")
    p.add_argument("--shortcut_lr", type=float, default=d.shortcut_lr,
                   help="learning rate of stage 2 (default: %(default)s)")
    p.add_argument("--finetune_epochs", type=int, default=d.finetune_epochs,
                   help="fine-tuning epochs of every few-shot method (default: %(default)s, the paper's)")
    p.add_argument("--finetune_lr", type=float, default=d.finetune_lr,
                   help="AdamW learning rate of every method (default: %(default)s)")
    p.add_argument("--images_per_class", type=int, default=d.images_per_class,
                   help="P: fine-tuning images per class (default: %(default)s, the paper's)")
    p.add_argument("--class_fraction", type=float, default=d.class_fraction,
                   help="share of the classes fine-tuned on: 1 (default) or 0.5 (the paper's Table 4 split: "
                   "OOD top-1 reported on fine-tuned and held-out classes)")
    p.add_argument("--full_split_epochs", type=int, default=d.full_split_epochs,
                   help="epochs of the methods trained on the whole training split (rrda_full, cft_full) "
                   "(default: %(default)s)")
    p.add_argument("--fewshot_pool", default=d.fewshot_pool, choices=["train", "counterfactual"],
                   help="few-shot images from the biased training split, or only those off their class's "
                   "background (default: %(default)s)")
    p.add_argument("--mask_source", default=d.mask_source, choices=["benchmark", "pipeline"],
                   help="masks for fine-tuning: the benchmark's, or made by the mask stage (concepts validated and "
                   "grounded; the oracle grounder stands in for Grounded-SAM) (default: %(default)s)")
    p.add_argument("--data_dir", default=None,
                   help="benchmark folder (default: $CFT_CACHE or ~/.cache/cft_lightning, where the starting models "
                   "are cached too)")
    p.add_argument("--overlays", type=int, default=6, help="relevance overlays to draw (default: %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="PyTorch threads for training and testing (default: %(default)s, with which the starting "
                   "models and numbers of docs/demo.md were made and come out again with the same torch build; "
                   "more threads are faster but train other models, cached separately)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: rewrite the summary, tables and pictures from the results already in --out "
                   "for --seeds and --methods (e.g. after runs of method subsets in parallel into one folder)")
    p.add_argument("--calibrate", action="store_true",
                   help="only build (or load) the starting models and write calibration.md: the criteria of "
                   "docs/demo.md per seed")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bars (they are off anyway when stderr is not a terminal: one line per stage "
                   "is printed instead)")
    return p


def _overlays(settings: DemoSettings, summary: dict, count: int) -> Path | None:
    """`overlays.png`: the first `count` OOD test images as the models saw them (the data's evaluation
    transform), their concept masks, and the AttnLRP maps of the Original and of every method's fine-tuned model."""
    import torch

    from cft_lightning.data.image_folder import load_image
    from cft_lightning.data.mask_store import MaskStore
    from cft_lightning.data.transforms import JointTransform
    from cft_lightning.evaluation.overlays import explain_models, save_overlays
    from cft_lightning.models.backbone import build_backbone, resolve_data_config
    from cft_lightning.relevance import AttnLRP

    seed_dir = Path(settings.out) / f"seed_{settings.seeds[0]}"
    data = Path(summary["data"])
    names = sorted(p.name for p in (data / "images" / "test_ood").iterdir())
    rels = [f"{names[i % len(names)]}/test_ood_{i // len(names):04d}.png" for i in range(count)]
    start = json.loads((seed_dir / "start.json").read_text())["weights"]
    models = {"original": build_backbone(settings.backbone(start)).eval()}
    for method in settings.methods:
        models[method] = build_backbone(settings.backbone(str(seed_dir / method / "fine_tuned.pth"))).eval()
    config = resolve_data_config(models["original"])  # the data config the demo's data module normalised with
    transform = JointTransform(config, train=False)
    store = MaskStore(data / "masks")
    shown = [transform(load_image(data / "images" / "test_ood" / r), {"concept": store.read(r, "concept")})
             for r in rels]
    images = torch.stack([image for image, _ in shown])
    masks = torch.stack([mask["concept"] for _, mask in shown]).numpy()
    classes = sorted(p.name for p in (data / "images" / "train").iterdir() if p.is_dir())  # the label order
    explained = explain_models(models, AttnLRP(), images)
    return save_overlays(Path(settings.out) / "overlays.png", images, config, explained, classes,
                         labels=[classes.index(r.split("/")[0]) for r in rels], masks=masks)


def _calibrate(settings: DemoSettings) -> None:
    from rich.console import Console

    from cft_lightning.benchmarks import build_shortcut_parts
    from cft_lightning.demo import calibration
    from cft_lightning.demo.start import build_start, torch_threads

    data = build_shortcut_parts(settings.data_dir, settings.benchmark, progress=settings.progress)
    out = Path(settings.out)
    with torch_threads(settings.threads):
        starts = {str(seed): build_start(settings, data, seed, out / f"seed_{seed}") for seed in settings.seeds}
    path = calibration.write(starts, out / "calibration.md")
    Console().print(path.read_text())
    for line in calibration.failed(starts):
        Console(stderr=True).print(f"[yellow]calibration criterion missed:[/] {line}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft demo`."""
    from rich.console import Console

    args = _parser().parse_args(argv)
    from cft_lightning.demo import calibration
    from cft_lightning.demo.pipeline import collect, run_demo
    from cft_lightning.demo.report import bar_chart, paired, paired_markdown, summarize, summary_markdown

    args.methods = list(dict.fromkeys(m for name in args.methods for m in METHOD_GROUPS.get(name, [name])))
    benchmark = ShortcutPartsSpec(num_classes=args.num_classes, image_size=args.image_size,
                                  train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                  spurious_rate=args.spurious_rate, decoy=args.decoy or args.decoy_only,
                                  background_shortcut=not args.decoy_only,
                                  decoy_side=args.decoy_side or (args.image_size // 6 if args.decoy_only else None))
    settings = DemoSettings(out=args.out, seeds=args.seeds, methods=args.methods, benchmark=benchmark,
                            data_dir=args.data_dir, start=args.start, pretrain_epochs=args.pretrain_epochs,
                            scratch_epochs=args.scratch_epochs,
                            pretrain_lr=args.pretrain_lr, shortcut_epochs=args.shortcut_epochs,
                            shortcut_lr=args.shortcut_lr,
                            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                            images_per_class=args.images_per_class, class_fraction=args.class_fraction,
                            full_split_epochs=args.full_split_epochs, fewshot_pool=args.fewshot_pool,
                            mask_source=args.mask_source, critic=args.critic, threads=args.threads,
                            progress=not args.no_progress and sys.stderr.isatty())
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        _calibrate(settings)
        return
    if args.report:
        summary = collect(settings)
    else:
        summary = run_demo(settings)
    table = summarize(summary["results"])
    text = summary_markdown(table)
    comparisons = {base: paired(summary["results"], base) for base in ("original", "plain")}
    for base, diffs in comparisons.items():
        if diffs:
            text += f"\nPaired differences to {base}, per seed (x100; [95 % bootstrap interval of the mean]; " \
                    f"(seeds above {base} / seeds); bold: the interval excludes 0):\n\n" + paired_markdown(diffs, base)
    out = Path(settings.out)
    (out / "summary.md").write_text(text)
    (out / "summary_table.json").write_text(json.dumps(
        {"summary": table, "paired": {base: {row: {label: asdict(d) for label, d in metrics.items()}
                                             for row, metrics in diffs.items()}
                                      for base, diffs in comparisons.items()}}, indent=2) + "\n")
    bar_chart(table, out / "metrics.png", comparisons["original"] or None)
    starts = summary.get("starts") or {}
    if starts:
        calibration.write(starts, out / "calibration.md")
    if args.overlays > 0:
        _overlays(settings, summary, args.overlays)
    console = Console()
    console.print(f"\n[bold]cft demo[/] seeds {settings.seeds}: values x100 (mean ± std over seeds)\n")
    console.print(text)
    for line in calibration.failed(starts):
        console.print(f"[yellow]calibration criterion missed:[/] {line} (docs/demo.md)")
    console.print(f"files: {out / 'summary.md'}, {out / 'metrics.png'}, {out / 'overlays.png'}")
