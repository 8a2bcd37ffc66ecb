"""The named benchmarks as test splits of `GuidanceDataModule` (`cft test --benchmarks`).

Roots come from `data.benchmarks` or `CFT_BENCHMARK_<NAME>`; the selection from `data.benchmark_names` (set
by `--benchmarks`). Each benchmark becomes one test dataset with its scorer (the protocol's rank function),
and, when the label space is ImageNet-1k, a fine-tuned / held-out flag per image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from cft_lightning.benchmarks.imagenet_seg import ImageNetSegmentation
from cft_lightning.benchmarks.robustness import BENCHMARKS, BenchmarkDataset, get_benchmark
from cft_lightning.errors import DataError

__all__ = ["ALL_BENCHMARKS", "BENCHMARK_DATASETS", "BenchmarkTestSplits"]

# classification benchmarks (robustness.py) and the segmentation set for relevance alignment (its root: the .mat file)
ALL_BENCHMARKS = [*BENCHMARKS, "imagenet_seg"]
BENCHMARK_DATASETS = (BenchmarkDataset, ImageNetSegmentation)


class BenchmarkTestSplits:
    """Mixin of `GuidanceDataModule`: expects `benchmarks`, `benchmark_names`, `benchmark_protocol`, `classes`,
    `root`, `class_names`, `selection` and `_resolve_data_config`."""

    benchmarks: dict[str, str]
    benchmark_names: str | list[str] | None
    benchmark_protocol: str

    def _benchmark_splits(self, eval_tf: Any) -> Iterator[tuple[str, Any, Any]]:
        """(name, dataset, scorer) of every selected benchmark, in registry order."""
        seen = self._seen_imagenet_classes()
        for name, root in self._selected_benchmarks().items():
            if name == "imagenet_seg":  # relevance alignment only (object masks, no labels)
                dataset = ImageNetSegmentation(root, self._resolve_data_config())  # type: ignore[attr-defined]
                rank_zero_info(f"cft test: ImageNet-Segmentation: {len(dataset)} images from {root}")
                yield name, dataset, None
                continue
            bench, samples = get_benchmark(name, root, self.benchmark_protocol)  # type: ignore[arg-type]
            rank_zero_info(f"cft test: {bench.title}: {len(samples)} images from {root}")
            yield name, BenchmarkDataset(root, bench, samples, eval_tf, seen), bench.rank

    def benchmark_roots(self) -> dict[str, str]:
        """Every benchmark with a root: `data.benchmarks`, then `CFT_BENCHMARK_<NAME>` environment variables."""
        roots = {}
        for name in ALL_BENCHMARKS:
            root = self.benchmarks.get(name) or os.environ.get(f"CFT_BENCHMARK_{name.upper()}")
            if root:
                roots[name] = root
        return roots

    def _selected_benchmarks(self) -> dict[str, str]:
        roots = self.benchmark_roots()
        names = self.benchmark_names
        if names is None:
            return roots
        if names in ("none", "", []):
            return {}
        if names == "all":
            skipped = [n for n in ALL_BENCHMARKS if n not in roots]
            if skipped:
                rank_zero_info(
                    "cft test: skipped (no root in data.benchmarks or CFT_BENCHMARK_<NAME>): " + ", ".join(skipped)
                )
            return roots
        wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
        unknown = [n for n in wanted if n not in ALL_BENCHMARKS]
        if unknown:
            raise DataError(f"--benchmarks: unknown benchmark(s) {unknown}; known: {', '.join(ALL_BENCHMARKS)}")
        missing = [n for n in wanted if n not in roots]
        if missing:
            raise DataError(f"--benchmarks: no root for {missing}: set data.benchmarks.<name> or "
                            f"CFT_BENCHMARK_{missing[0].upper()}")
        return {n: roots[n] for n in wanted}

    def _seen_imagenet_classes(self) -> set[int] | None:
        """ImageNet indices of the fine-tuning classes, when the label space is ImageNet-1k and root exists."""
        if self.classes != "imagenet" or not os.path.isdir(self.root):
            return None
        index = {name: i for i, name in enumerate(self.class_names)}
        return {index[c] for c in self.selection.fine_tuning_classes}
