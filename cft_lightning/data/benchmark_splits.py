"""The named benchmarks as test splits of `GuidanceDataModule` (`cft test --benchmarks`).

`BenchmarkSelection` holds the roots (`data.benchmarks`, else `CFT_BENCHMARK_<NAME>`), the selection
(`data.benchmark_names`, set by `--benchmarks`) and the protocol. `test_splits` builds, for each selected
benchmark, its dataset and its `TestSplit` (scorer: the protocol's rank function; label names: the benchmark's
class list) and, when the label space is ImageNet-1k, a fine-tuned / held-out flag per image. Everything it needs
is passed in: the data module composes it rather than inheriting from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from cft_lightning.benchmarks.imagenet_seg import ImageNetSegmentation
from cft_lightning.benchmarks.robustness import BENCHMARKS, BenchmarkDataset, get_benchmark
from cft_lightning.errors import DataError
from cft_lightning.evaluation.test_plan import TestSplit

__all__ = ["ALL_BENCHMARKS", "BENCHMARK_DATASETS", "PROTOCOLS", "BenchmarkSelection"]

# classification benchmarks (robustness.py) and the segmentation set for relevance alignment (its root: the .mat file)
ALL_BENCHMARKS = [*BENCHMARKS, "imagenet_seg"]
BENCHMARK_DATASETS = (BenchmarkDataset, ImageNetSegmentation)
PROTOCOLS = ("standard", "release")


@dataclass(frozen=True)
class BenchmarkSelection:
    """Which benchmarks `test` runs and where they are.

    Attributes:
        roots: `data.benchmarks`, `{name: folder}` (ImageNet-Segmentation: the path of `gtsegs_ijcv.mat`).
        names: `data.benchmark_names`: None (every configured one), `all` (the same, and the unconfigured ones
            are named as skipped), `none`, a comma-separated string or a list (each must be configured).
        protocol: `standard` or `release` (`data.benchmark_protocol`).
    """

    roots: Mapping[str, str] = field(default_factory=dict)
    names: str | list[str] | None = None
    protocol: str = "standard"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.roots) - set(ALL_BENCHMARKS))
        if unknown:
            raise DataError(f"data.benchmarks: unknown benchmark(s) {unknown}; known: {', '.join(ALL_BENCHMARKS)}")
        if self.protocol not in PROTOCOLS:
            raise DataError(f"data.benchmark_protocol must be 'standard' or 'release', got {self.protocol!r}")
        object.__setattr__(self, "roots", dict(self.roots))

    def configured(self) -> dict[str, str]:
        """Every benchmark with a root: `data.benchmarks`, then `CFT_BENCHMARK_<NAME>` environment variables."""
        roots = {}
        for name in ALL_BENCHMARKS:
            root = self.roots.get(name) or os.environ.get(f"CFT_BENCHMARK_{name.upper()}")
            if root:
                roots[name] = root
        return roots

    def selected(self) -> dict[str, str]:
        """The benchmarks `test` runs, {name: root} in registry order; an unknown or unconfigured name is an error."""
        roots = self.configured()
        names = self.names
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

    def test_splits(self, eval_tf: Any, data_config: Mapping[str, Any], seen: set[int] | None
                    ) -> list[tuple[TestSplit, Any]]:
        """(split, dataset) of every selected benchmark, in registry order. `eval_tf`: the evaluation transform;
        `data_config`: its config (ImageNet-Segmentation resizes without a crop); `seen`: the ImageNet indices of
        the fine-tuning classes (None: no fine-tuned / held-out split)."""
        out: list[tuple[TestSplit, Any]] = []
        for name, root in self.selected().items():
            if name == "imagenet_seg":  # relevance alignment only (object masks, no labels)
                dataset = ImageNetSegmentation(root, dict(data_config))
                rank_zero_info(f"cft test: ImageNet-Segmentation: {len(dataset)} images from {root}")
                out.append((TestSplit(name, is_benchmark=True), dataset))
                continue
            bench, samples = get_benchmark(name, root, self.protocol)  # type: ignore[arg-type]
            rank_zero_info(f"cft test: {bench.title}: {len(samples)} images from {root}")
            split = TestSplit(name, scorer=bench.rank, label_names=tuple(bench.class_names) or None,
                              is_benchmark=True, imagenet_logits=True)
            out.append((split, BenchmarkDataset(root, bench, samples, eval_tf, seen)))
        return out
