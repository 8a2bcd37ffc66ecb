"""`cft demo`: the embedded end-to-end run on CPU (no GPU, no ImageNet, no internet).

    cft demo                                    # one seed, plain / object-mask / CFT fine-tuning
    cft demo --seeds 0 1 2 --out runs/demo3     # the figures in docs/demo.md
    cft demo --seeds 0 1 2 --print_config > demo.yaml && cft demo --config demo.yaml   # the same run

The options are the fields of `DemoSettings` (its benchmark's fields among them, as top-level flags) and those
of `demo_command` (`_tool_cli.Tool`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from cft_lightning._tool_cli import Tool
from cft_lightning.demo.settings import METHOD_GROUPS, METHOD_NAMES, DemoSettings, method_syntax

__all__ = ["TOOL", "DemoSettings", "collect", "demo_command", "demo_settings", "main", "run_demo"]


def __getattr__(name: str) -> Any:
    """`collect` and `run_demo` import torch and Lightning: loaded on first use, so `cft demo --help` is instant."""
    if name in ("collect", "run_demo"):
        return getattr(importlib.import_module("cft_lightning.demo.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def demo_settings(settings: DemoSettings, decoy_only: bool = False, no_progress: bool = False) -> DemoSettings:
    """The settings a `cft demo` command line runs: method groups expanded (`all`, `probes`, `table7`; each method
    once, in order), `--decoy_only` applied to the benchmark, progress bars only on a terminal."""
    methods = list(dict.fromkeys(m for name in settings.methods for m in METHOD_GROUPS.get(name, [name])))
    benchmark = settings.benchmark
    if decoy_only:  # the decoy alone carries the class; a smaller decoy than image_size // 6 is not picked up
        benchmark = dataclasses.replace(benchmark, decoy=True, background_shortcut=False,
                                        decoy_side=benchmark.decoy_side or benchmark.image_size // 6)
    return dataclasses.replace(settings, methods=methods, benchmark=benchmark,
                               progress=not no_progress and sys.stderr.isatty())


def demo_command(settings: DemoSettings, decoy_only: bool = False, overlays: int = 6, report: bool = False,
                 calibrate: bool = False, no_progress: bool = False) -> None:
    """Does guided fine-tuning repair a shortcut? A starting model that knows the parts but leans on the
    background, fine-tuned by each method and tested with the decision-reliance diagnostics, on CPU
    (docs/demo.md).

    Args:
        settings: what the demo trains and tests (each field a flag: --out, --seeds, --methods, ...)
        decoy_only: DecoyMNIST-style: the decoy alone carries the class (backgrounds at random; the decoy side
            defaults to image_size // 6, where the pretrained ViT does not pick up a smaller one)
        overlays: relevance overlays to draw (0: none)
        report: train nothing: rewrite the summary, tables and pictures from the results already in --out for
            --seeds and --methods (e.g. after runs of method subsets in parallel into one folder)
        calibrate: only build (or load) the starting models and write calibration.md: the criteria of
            docs/demo.md per seed
        no_progress: no progress bars (they are off anyway when stderr is not a terminal: one line per stage is
            printed instead)
    """
    settings = demo_settings(settings, decoy_only, no_progress)
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    if calibrate:
        _calibrate(settings)
        return
    from rich.console import Console

    from cft_lightning.demo import calibration
    from cft_lightning.demo.pipeline import collect, run_demo
    from cft_lightning.demo.report import bar_chart, paired, paired_markdown, summarize, summary_markdown

    if report:
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
        {"summary": table, "paired": {base: {row: {label: dataclasses.asdict(d) for label, d in metrics.items()}
                                             for row, metrics in diffs.items()}
                                      for base, diffs in comparisons.items()}}, indent=2) + "\n")
    bar_chart(table, out / "metrics.png", comparisons["original"] or None)
    written = [out / "summary.md", out / "summary_table.json", out / "metrics.png"]
    starts = summary.get("starts") or {}
    if starts:
        calibration.write(starts, out / "calibration.md")
        written.append(out / "calibration.md")
    if overlays > 0 and (drawn := _overlays(settings, summary, overlays)) is not None:
        written.append(drawn)
    console = Console()
    console.print(f"\n[bold]cft demo[/] seeds {settings.seeds}: values x100 (mean ± std over seeds)\n")
    console.print(text)
    for line in calibration.failed(starts):
        console.print(f"[yellow]calibration criterion missed:[/] {line} (docs/demo.md)")
    console.print("files: " + ", ".join(str(path) for path in written), soft_wrap=True)  # what this run wrote


_GROUPS = "; ".join(f"{name} = {' '.join(members)}" for name, members in METHOD_GROUPS.items())
TOOL = Tool(demo_command, prog="cft demo", flatten=("settings", "benchmark"),
            skip=("depth", "embed_dim", "patch_size", "critique_segments", "batch_size", "progress", "val_per_class",
                  "background_shortcut", "seed"),
            epilog=f"--methods takes recipes ({', '.join(sorted(METHOD_NAMES))}), groups ({_GROUPS}), or "
            f"{method_syntax()}, e.g. cft+ixg or my_pkg.mod.MyReg (docs/demo.md, docs/extending.md).")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cft demo`: flags, or a YAML file with --config (`cft demo --print_config` writes one)."""
    TOOL(argv)
