"""Concept masks for a set of images from a concept bank and a grounder (the core of `cft masks`).

For each image of class c with concepts K_c: one mask per concept (the grounder's mask for that prompt: the
union of its boxes' segments), the image's `concept` mask as their union (max), and the `object` mask from
the class-name prompt. Per-concept masks are kept in the store (`concepts/<slug>/...`). Writes are atomic
and an image whose masks all exist is skipped, so a rerun after a crash resumes without duplicates or
partial files. The grounder is `concepts.validate.Grounder`: the oracle on the embedded benchmark, or the
GroundingDINO + SAM models (`grounded_sam.py`) through the same path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cft_lightning.concepts.validate import Grounder
from cft_lightning.data.mask_store import MaskStore

__all__ = ["generate_masks", "ground_and_write"]


def _done(store: MaskStore, rel: str, concepts: Sequence[str]) -> bool:
    return (store.has(rel, "concept") and store.has(rel, "object")
            and all(store.has(rel, "concept", concept=c) for c in concepts))


def ground_and_write(store: MaskStore, grounder: Grounder, rel: str, class_name: str,
                     concepts: Sequence[str]) -> dict[str, Any]:
    """Ground one image and write its masks, unless they all exist; returns the image's record."""
    if _done(store, rel, concepts):
        return {"image": rel, "skipped": True}
    masks = grounder(rel, class_name, [*concepts, class_name])
    union = np.zeros_like(masks[class_name], dtype=bool)
    for concept in concepts:
        union |= masks[concept]
        store.write(rel, "concept", masks[concept], concept=concept)
    store.write(rel, "object", masks[class_name])
    store.write(rel, "concept", union)  # last: with the object mask, its presence marks the image as done
    found = sum(bool(masks[c].any()) for c in concepts)
    return {"image": rel, "skipped": False, "concepts_found": found, "empty": not union.any()}


def generate_masks(
    images: dict[str, list[str]],
    bank: dict[str, list[str]],
    grounder: Grounder,
    store: str | os.PathLike[str],
    class_names: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write concept, per-concept and object masks for `images` ({class: [rel paths]}); returns a summary:
    images written / skipped, concepts found per image (mean), images whose concept mask is empty."""
    from rich.progress import track

    out = MaskStore(store)
    todo = [(cls, rel) for cls, rels in images.items() for rel in rels]
    written, skipped, found, empty = 0, 0, [], []
    for cls, rel in track(todo, description="grounding concepts", disable=not progress):
        record = ground_and_write(out, grounder, rel, (class_names or {}).get(cls, cls), bank.get(cls, []))
        if record["skipped"]:
            skipped += 1
            continue
        written += 1
        found.append(record["concepts_found"])
        if record["empty"]:
            empty.append(rel)
    out.update_manifest(kinds=["concept", "object"])
    return {"written": written, "skipped": skipped, "mean_concepts_found": float(np.mean(found)) if found else 0.0,
            "empty_concept_masks": empty}
