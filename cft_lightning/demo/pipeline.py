"""The embedded demo: a shortcut model, repaired (or not) by guided fine-tuning, on the shortcut-parts benchmark.

Steps, per seed:
1. the starting model (`demo/start.py`): by default a small ViT that first learns the parts on upstream images
   with uninformative backgrounds, then leans on the background after training on the biased split (cached
   per recipe, reused by every method and output folder);
2. fine-tune it with each method (PlainFineTuning, ObjectMaskGuidance, CFT, ...) on a few-shot masked subset:
   P images per class on all or half of the classes, as in the paper;
3. test Original and fine-tuned side by side on the in-distribution and out-of-distribution splits, with
   relevance alignment and the decision-reliance diagnostics.
Then the summary over seeds (mean, spread, paired differences), overlays and a bar chart (`demo/report.py`).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch

from cft_lightning.benchmarks import build_shortcut_parts
from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.data.image_folder import GuidanceDataset, build_samples
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.transforms import build_transforms
from cft_lightning.demo.settings import (
    ALL_METHODS,
    CRITIC_KIND,
    DEFAULT_RELEVANCE,
    METHOD_GROUPS,
    METHOD_OPTIONS,
    PROBE_METHODS,
    RECIPES,
    TABLE7_METHODS,
    DemoSettings,
    parse_method,
)
from cft_lightning.demo.start import build_start, demo_trainer, stage_note, torch_threads
from cft_lightning.errors import PluginError, UnknownPluginError
from cft_lightning.models import GuidedFineTuner
from cft_lightning.models.backbone import build_backbone, resolve_data_config
from cft_lightning.regularizers import Regularizer, create_regularizer
from cft_lightning.relevance import AttnLRP, RelevanceMethod, create_relevance

__all__ = [
    "ALL_METHODS",
    "METHOD_OPTIONS",
    "METHOD_GROUPS",
    "PROBE_METHODS",
    "RECIPES",
    "TABLE7_METHODS",
    "DemoSettings",
    "build_method",
    "collect",
    "oracle_critic_store",
    "run_demo",
]

def build_method(spec: str) -> tuple[Regularizer, RelevanceMethod | None]:
    """The regularizer and relevance method a `--methods` entry fine-tunes with: a recipe (`RECIPES`) or
    `REGULARIZER[+RELEVANCE]` (registered names or class paths, built with their defaults). A regularizer that
    needs relevance gets `DEFAULT_RELEVANCE` (AttnLRP) when none is named; one that needs none refuses one."""
    recipe = parse_method(spec)
    try:
        regularizer = create_regularizer(recipe.regularizer, **recipe.regularizer_args)
        name = recipe.relevance
        if not regularizer.requirements.relevance:
            if name is not None and spec not in RECIPES:
                raise PluginError(f"cft demo --methods {spec!r}: {type(regularizer).__name__} uses no relevance "
                                  f"method; drop +{name}")
            return regularizer, None
        return regularizer, create_relevance(name or DEFAULT_RELEVANCE, **recipe.relevance_args)
    except UnknownPluginError as exc:
        bare = spec not in RECIPES and "+" not in spec
        message = f"{spec!r} is no recipe or group and {exc}" if bare else f"{spec!r}: {exc}"
        raise UnknownPluginError(f"cft demo --methods {message} (recipes and groups: cft demo --help)") from exc


def fewshot_root(settings: DemoSettings, data: Path, out: Path) -> Path:
    """The folder the few-shot images are drawn from: the biased training split, or (`counterfactual`) a
    folder of links to the training images that do NOT stand on their class's background (same relative
    paths, so the mask store and the metadata still match)."""
    train = data / "images" / "train"
    if settings.fewshot_pool == "train":
        return train
    if settings.fewshot_pool != "counterfactual":
        raise ValueError(f"cft demo: fewshot_pool must be 'train' or 'counterfactual', got {settings.fewshot_pool!r}")
    pool = out / "fewshot_pool_counterfactual"
    n = settings.benchmark.num_classes
    with open(data / "metadata.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    rows = [r for r in rows if int(r["group_id"]) // n != int(r["group_id"]) % n]  # label != background
    for row in rows:
        link = pool / row["image"]
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((train / row["image"]).resolve())
    return pool


def oracle_critic_store(dm: GuidanceDataModule, data: Path, weights: Path, settings: DemoSettings,
                        store_dir: Path) -> Path:
    """A mask store for LVLM-VA: the benchmark's masks (linked) plus `critic` masks for the alignment set.

    The alignment set follows LVLM-VA's low-entropy sampling: the half of the few-shot training images on which
    the pretrained model's prediction has the lowest entropy. Their corrective mask is the background (1 - the
    object mask): what a perfect critic marks as spurious here, since the background is the shortcut. (The LVLM
    critic itself comes with the critique stage; the oracle isolates the alignment step.)
    """
    source = data / "masks"
    store_dir.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():  # object/concept masks and the manifest, shared with the benchmark
        link = store_dir / entry.name
        if not link.exists() and entry.name != CRITIC_KIND:
            link.symlink_to(entry.resolve())
    root = Path(dm.root)
    samples = build_samples(dm.selection.train, dm.class_names, None, str(root))
    model = build_backbone(settings.backbone(str(weights))).eval()
    _, eval_tf = build_transforms(resolve_data_config(model))
    loader = torch.utils.data.DataLoader(GuidanceDataset(root, samples, eval_tf), batch_size=64)
    with torch.inference_mode():
        probs = torch.cat([model(b["image"]).softmax(dim=1) for b in loader])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    chosen = entropy.argsort()[: max(1, len(samples) // 2)].tolist()
    store, masks = MaskStore(store_dir), MaskStore(source)
    for i in chosen:
        rel = samples[i].path
        if not store.has(rel, CRITIC_KIND):
            store.write(rel, CRITIC_KIND, ~masks.read(rel, "object"))
    return store_dir


def critique_store(dm: GuidanceDataModule, data: Path, weights: Path, settings: DemoSettings,
                   store_dir: Path) -> Path:
    """A mask store for LVLM-VA made by the critique stage (`cft critique`'s code path): the low-entropy half of
    the few-shot training images, input-x-gradient attributions, PPEPS-WGM segments, and the oracle critic
    reading the benchmark's `decoy` masks (a segment is spurious when half of its positive effect lies on
    the decoy); the benchmark's other masks are linked in."""
    from cft_lightning.critique import CritiqueSettings, OracleCritic, run_critique
    from cft_lightning.critique.attribution import build_attributor

    if not settings.benchmark.decoy:
        raise ValueError("cft demo: --critic pipeline needs a decoy benchmark (--decoy or --decoy_only): the oracle "
                         "critic reads the decoy masks")
    source = data / "masks"
    store_dir.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        link = store_dir / entry.name
        if not link.exists() and entry.name not in (CRITIC_KIND, "critique"):
            link.symlink_to(entry.resolve())
    samples = build_samples(dm.selection.train, dm.class_names, None, str(dm.root))
    model = build_backbone(settings.backbone(str(weights))).eval()
    critique = CritiqueSettings(samples=max(1, len(samples) // 2), segments=settings.critique_segments,
                                batch_size=16, progress=settings.progress, write_views=True)
    run_critique(model, resolve_data_config(model), dm.root, [(s.path, s.label) for s in samples],
                 list(dm.class_names), build_attributor("ixg", model), OracleCritic(0.5), store_dir,
                 {"*": "the creature's body and its two parts"}, critique, truth=(str(source), "decoy"))
    return store_dir


def decoy_alignment(model: torch.nn.Module, data: Path, split: str = "test_ood") -> float:
    """LVLM-VA's mu_align of `model` on a split of a decoy benchmark (input x gradient, explaining the label)."""
    from cft_lightning.critique.attribution import build_attributor
    from cft_lightning.critique.metrics import mu_align
    from cft_lightning.critique.stage import ImageItems

    root = data / "images" / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f"{c}/{f.name}", i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    transform = build_transforms(resolve_data_config(model))[1]
    loader = torch.utils.data.DataLoader(ImageItems(root, items, transform, (MaskStore(data / "masks"), "decoy")),
                                         batch_size=64)
    return mu_align(model, loader, build_attributor("ixg", model))


def finetune_and_test(settings: DemoSettings, data: Path, seed: int, method: str, weights: Path,
                      out: Path) -> dict[str, Any]:
    """Fine-tune the pretrained model with `method` and test Original vs fine-tuned; returns the results."""
    L.seed_everything(seed, workers=True)
    regularizer, relevance = build_method(method)
    options = METHOD_OPTIONS.get(method, {})
    full = bool(options.get("full_split"))
    model = GuidedFineTuner(settings.backbone(str(weights)), regularizer, relevance, lr=settings.finetune_lr,
                            lr_step_size=0, frozen=options.get("frozen"))
    classes = sorted(p.name for p in (data / "images" / "train").iterdir() if p.is_dir())
    extra_kinds = [k for k in regularizer.requirements.masks if k != CRITIC_KIND]  # e.g. decoy (critic: below)
    kwargs: dict[str, Any] = dict(
        root=str(fewshot_root(settings, data, out.parent)), classes=classes, masks=str(mask_store(settings, data)),
        mask_kinds=list(dict.fromkeys(["concept", "object", *extra_kinds])),
        class_fraction=1.0 if full else settings.class_fraction,
        images_per_class=None if full else settings.images_per_class, seed=seed,
        val_root=str(data / "images" / "val"), metadata=str(data / "metadata.csv"),
        test_root={"test_id": str(data / "images" / "test_id"), "test_ood": str(data / "images" / "test_ood")},
        batch_size=settings.batch_size, eval_batch_size=64, interventions=True,
    )
    dm = GuidanceDataModule(**kwargs)
    if not full:  # the fine-tuning images themselves, as a third test split: do their maps move, and the others'?
        kwargs["test_root"] = {**kwargs["test_root"], "fewshot": str(_link_selection(dm, out / "fewshot_images"))}
        dm = GuidanceDataModule(**kwargs)
    if regularizer.requirements.alignment is not None:  # LVLM-VA: the same few-shot images, the low-entropy
        # half with oracle critic masks; the data module takes the alignment set from the regularizer
        if settings.critic == "pipeline":
            store = critique_store(dm, data, weights, settings, out.parent / f"{method}_critique")
        elif settings.critic == "oracle_mask":
            store = oracle_critic_store(dm, data, weights, settings, out.parent / f"{method}_masks")
        else:
            raise ValueError(f"cft demo: critic must be 'oracle_mask' or 'pipeline', got {settings.critic!r}")
        kwargs.update(masks=str(store))
        dm = GuidanceDataModule(**kwargs)
    epochs = settings.full_split_epochs if full else settings.finetune_epochs
    trainer = demo_trainer(settings, out, epochs, limit_val_batches=0)
    images = sum(len(v) for v in dm.selection.train.values())
    stage_note(f"seed {seed}: fine-tuning {method} ({images} images, {epochs} epochs)",
               settings.progress)
    trainer.fit(model, dm)
    model.relevance = AttnLRP()  # alignment is measured with the same method for every row of the table
    stage_note(f"seed {seed}: testing {method} and the Original (ID and OOD)", settings.progress)
    trainer.test(model, dm, verbose=False)
    torch.save(model.backbone.state_dict(), out / "fine_tuned.pth")
    results = json.loads((out / "results.json").read_text())
    results["fine_tuning_classes"] = list(dm.fine_tuning_classes)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")  # the class split, for --report
    if settings.benchmark.decoy:  # LVLM-VA's alignment score, before and after, on the OOD split
        before = decoy_alignment(build_backbone(settings.backbone(str(weights))), data)
        after = decoy_alignment(model.backbone, data)
        results["splits"]["test_ood"]["metrics"]["mu_align"] = {"original": before, "fine_tuned": after,
                                                               "delta": after - before}
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _link_selection(dm: GuidanceDataModule, folder: Path) -> Path:
    """A folder of links to the few-shot training images (same relative paths, so masks and metadata match),
    made anew each time (a rerun with another selection must not test the union)."""
    if folder.exists():
        shutil.rmtree(folder)
    for images in dm.selection.train.values():
        for rel in images:
            link = folder / rel
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((Path(dm.root) / rel).resolve())
    return folder


def mask_store(settings: DemoSettings, data: Path) -> Path:
    """The mask store the fine-tuning reads: the benchmark's own, or (`mask_source: pipeline`) one built by the
    mask stage: the benchmark's concept bank validated on 30 images per class, then every image grounded (once
    per output folder; a rerun resumes)."""
    if settings.mask_source == "benchmark":
        return data / "masks"
    if settings.mask_source != "pipeline":
        raise ValueError(f"cft demo: mask_source must be 'benchmark' or 'pipeline', got {settings.mask_source!r}")
    from cft_lightning.concepts.bank import load_concept_bank
    from cft_lightning.concepts.validate import OracleGrounder, images_by_class, validate_bank
    from cft_lightning.masks.generate import generate_masks

    out = Path(settings.out) / "mask_stage"
    grounder = OracleGrounder(data / "masks")
    bank, report = validate_bank(load_concept_bank(data / "concepts.json"),
                                 images_by_class(data / "images" / "train"), grounder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "validated_concepts.json").write_text(json.dumps({"concepts": bank, "report": report}, indent=2) + "\n")
    for split in ("train", "val", "test_id", "test_ood"):
        generate_masks(images_by_class(data / "images" / split), bank, grounder, out / "masks",
                       progress=settings.progress)
    return out / "masks"


def collect(settings: DemoSettings) -> dict[str, Any]:
    """The summary `run_demo` returns, read back from the results already in `settings.out` (nothing trained);
    a seed or method without results is an error naming the missing file."""
    out = Path(settings.out)
    results: dict[str, Any] = {}
    starts: dict[str, Any] = {}
    for seed in settings.seeds:
        seed_dir = out / f"seed_{seed}"
        for method in settings.methods:
            path = seed_dir / method / "results.json"
            if not path.is_file():
                raise FileNotFoundError(f"cft demo --report: {path} does not exist; run seed {seed}, method "
                                        f"{method} first (or leave it out of --seeds / --methods)")
            result = json.loads(path.read_text())
            selection = seed_dir / method / "fine_tuning_classes.json"  # the data module's record of the split
            if "fine_tuning_classes" not in result and selection.is_file():
                result["fine_tuning_classes"] = json.loads(selection.read_text())["fine_tuning_classes"]
            results.setdefault(str(seed), {})[method] = result
        if (seed_dir / "start.json").is_file():
            starts[str(seed)] = json.loads((seed_dir / "start.json").read_text())
    previous = out / "summary.json"
    data = json.loads(previous.read_text())["data"] if previous.is_file() else str(
        build_shortcut_parts(settings.data_dir, settings.benchmark, progress=settings.progress))
    summary = {"settings": {**asdict(settings), "benchmark": asdict(settings.benchmark)}, "data": data,
               "starts": starts, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run every seed and method; returns {seed: {method: results}} and writes `summary.json`."""
    with torch_threads(settings.threads):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict[str, Any]:
    for method in settings.methods:  # every entry resolves before anything is built or trained
        build_method(method)
    out = Path(settings.out)
    stage_note("checking (or generating) the shortcut-parts benchmark", settings.progress)
    data = build_shortcut_parts(settings.data_dir, settings.benchmark, progress=settings.progress)
    all_results: dict[str, Any] = {}
    starts: dict[str, Any] = {}
    for seed in settings.seeds:
        seed_dir = out / f"seed_{seed}"
        start = build_start(settings, data, seed, seed_dir)
        starts[str(seed)] = start
        weights = start.weights
        for method in settings.methods:
            all_results.setdefault(str(seed), {})[method] = finetune_and_test(
                settings, data, seed, method, weights, seed_dir / method
            )
    summary = {"settings": {**asdict(settings), "benchmark": asdict(settings.benchmark)}, "data": str(data),
               "starts": starts, "results": all_results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
