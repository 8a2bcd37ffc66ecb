"""The critique stage end to end (`cft critique` and the demo call this): sample, attribute, segment, critique,
write the corrective masks, then the summary and the readable report."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from cft_lightning._io import atomic_write
from cft_lightning.critique.attribution import Attributor
from cft_lightning.critique.critic import Critic
from cft_lightning.critique.sampling import lowest_entropy
from cft_lightning.critique.stage import KIND, CritiqueGeneration, EntropyScoring, ImageItems, read_jsonl
from cft_lightning.data.mask_store import MaskStore
from cft_lightning.data.transforms import JointTransform, parse_data_config
from cft_lightning.errors import DataError

__all__ = ["CritiqueSettings", "run_critique"]


@dataclass
class CritiqueSettings:
    """How many images, how many segments, and how the Lightning run is laid out.

    Attributes:
        samples: N, the size of the alignment set (LVLM-VA: unpublished; our default 64).
        segments: J, PPEPS-WGM components (unpublished; our default 4).
        target: the class the attribution explains, `label` (what the critic is told) or `prediction`.
        batch_size: images per predict step.
        concurrency: images of a batch critiqued at once (threads: the critic's requests wait on the network).
        seed: k-means initialisation of the mixture.
        trainer: extra `lightning.Trainer` arguments (accelerator, devices, num_nodes, ...).
    """

    samples: int = 64
    segments: int = 4
    target: str = "label"
    batch_size: int = 16
    concurrency: int = 4
    seed: int = 0
    progress: bool = True
    write_views: bool = True
    trainer: dict[str, Any] = field(default_factory=dict)


def _trainer(settings: CritiqueSettings, out: Path) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_model_summary=False,
                  enable_progress_bar=settings.progress, default_root_dir=str(out), inference_mode=False)
    kwargs.update(settings.trainer)
    return L.Trainer(**kwargs)


def run_critique(
    model: nn.Module,
    data_config: Any,
    root: str | os.PathLike[str],
    items: list[tuple[str, int]],
    class_ids: list[str],
    attributor: Attributor,
    critic: Critic,
    store: str | os.PathLike[str],
    descriptions: dict[str, str],
    settings: CritiqueSettings | None = None,
    truth: tuple[str, str] | None = None,
    class_names: dict[str, str] | None = None,
    usage: dict[str, dict[str, int]] | None = None,
    prices: tuple[float, float] | None = None,
) -> dict[str, Any] | None:
    """Critique the N lowest-entropy of `items` ((key, label index) under `root`) and write `critic` masks into
    `store`. `truth` = (mask store, kind) gives the oracle critic its ground truth. Returns the summary on
    global rank 0 (None elsewhere); it is also written to `<store>/critique/summary.json` with `report.md`."""
    settings = settings or CritiqueSettings()
    if not items:
        raise DataError(f"{root}: no images to critique")
    out = Path(store)
    config = parse_data_config(data_config)
    transform = JointTransform(config, train=False)
    truth_store = (MaskStore(truth[0]), truth[1]) if truth is not None else None
    if truth_store is not None:
        missing = [k for k, _ in items if not truth_store[0].has(k, truth[1])]
        if missing:
            raise DataError(f"oracle masks: {len(missing)} image(s) have no {truth[1]!r} mask in {truth[0]}, "
                            f"e.g. {truth_store[0].path(missing[0], truth[1])}")

    def loader(chosen: list[tuple[str, int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(ImageItems(root, chosen, transform, truth_store),
                                           batch_size=settings.batch_size, shuffle=False)

    trainer = _trainer(settings, out)
    scored = {r["image"] for r in read_jsonl(out / "critique" / "entropy")}
    remaining = [it for it in items if it[0] not in scored]  # a resumed run scores only what is missing
    if remaining:
        trainer.predict(EntropyScoring(model, out), loader(remaining), return_predictions=False)
    trainer.strategy.barrier()
    entropy = {r["image"]: r["entropy"] for r in read_jsonl(out / "critique" / "entropy")}
    labels = dict(items)
    chosen = lowest_entropy({k: v for k, v in entropy.items() if k in labels}, settings.samples)
    stage = CritiqueGeneration(model, attributor, critic, out, class_ids, descriptions, class_names,
                               segments=settings.segments, target=settings.target, mean=config.mean, std=config.std,
                               data_config=config, seed=settings.seed, write_views=settings.write_views,
                               concurrency=settings.concurrency)
    trainer.predict(stage, loader([(k, labels[k]) for k in chosen]), return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return None
    return _summarize(out, chosen, entropy, critic.name, attributor.name, settings, usage, prices)


def _summarize(out: Path, chosen: list[str], entropy: dict[str, float], critic: str, attribution: str,
               settings: CritiqueSettings, usage: dict[str, dict[str, int]] | None,
               prices: tuple[float, float] | None) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}
    for record in read_jsonl(out / "critique" / "records"):  # the last record of an image wins (reruns)
        latest[record["image"]] = record
    store = MaskStore(out)
    done = [k for k in chosen if store.has(k, KIND)]
    failed = {k: latest[k].get("error", "") for k in chosen if not store.has(k, KIND) and k in latest}
    ok = [latest[k] for k in done if latest.get(k, {}).get("status") == "ok"]
    summary: dict[str, Any] = {
        "critic": critic, "attribution": attribution, "samples": settings.samples, "segments": settings.segments,
        "alignment_set": len(chosen), "masks_written": len(done), "failed": failed,
        "with_spurious_segment": sum(any(r["spurious"]) for r in ok),
        "mean_spurious_share": (sum(r["spurious_share"] for r in ok) / len(ok)) if ok else 0.0,
        "entropy_range": [min(entropy[k] for k in chosen), max(entropy[k] for k in chosen)] if chosen else None,
    }
    if usage is not None:
        summary["usage"] = usage
        if prices is not None:
            tokens_in = sum(u.get("prompt_tokens", 0) for u in usage.values())
            tokens_out = sum(u.get("completion_tokens", 0) for u in usage.values())
            summary["cost_usd"] = round((tokens_in * prices[0] + tokens_out * prices[1]) / 1e6, 6)
    store.update_manifest(kinds=sorted(set(store.kinds()) | {KIND}),
                          extra={"critique": {k: summary[k] for k in ("critic", "attribution", "samples", "segments")}})
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "critique" / "summary.json", lambda fh: fh.write(text.encode("utf-8")))
    report = _report(summary, [latest[k] for k in chosen if k in latest])
    atomic_write(out / "critique" / "report.md", lambda fh: fh.write(report.encode("utf-8")))
    return summary


def _report(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [f"# Critique ({summary['critic']} critic, {summary['attribution']} attribution)", "",
             f"{summary['masks_written']} of {summary['alignment_set']} alignment images have a corrective mask; "
             f"{summary['with_spurious_segment']} have at least one spurious segment; "
             f"{len(summary['failed'])} failed.", ""]
    for r in records:
        lines += [f"## {r['image']}", "",
                  f"label {r['label']}, predicted {r['prediction']}, status {r['status']}", ""]
        if r["status"] != "ok":
            lines += [f"error: {r.get('error', '')}", ""]
            continue
        verdicts = ", ".join(f"{j + 1}: {'spurious' if s else 'relevant'} ({100 * share:.0f}%)"
                             for j, (s, share) in enumerate(zip(r["spurious"], r["shares"])))
        view = Path("views") / Path(r["image"]).with_suffix(".png")
        lines += [f"verdicts (share of positive effect): {verdicts}", "", f"![segments]({view.as_posix()})", "",
                  "critic's reasoning:", "", *[f"> {line}" for line in r["reasoning"].splitlines()], ""]
        if r.get("notes"):
            lines += [f"notes: {'; '.join(r['notes'])}", ""]
    return "\n".join(lines)
