"""What a data module tells the model about its data: `TestPlan`, a frozen description, handed over in one place.

The model never reads attributes of a data module back. A data module that has test splits describes them in a
`TestPlan` (its `test_plan()` method, the `DescribesTests` protocol): the splits in dataloader order, each with
its scorer and label names, the label space the model's outputs are named by, the metadata groups and the data
config the images are normalised with. `plan_of(datamodule)` is the one hand-off point: `GuidedFineTuner`
calls it in `setup` and builds its test `Evaluation` from the plan, and the `RelevanceOverlays` callback reads
the class names and normalisation of its pictures from it. A data module without `test_plan()` (a plain
`LightningDataModule`, or `Trainer.test(dataloaders=...)`) gets `TestPlan.default`: one split per dataloader,
`test` (or `test_0`, `test_1`, ...), scored over all classes, images shown with the model's own data config.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DescribesTests", "TestPlan", "TestSplit", "default_split_names", "plan_of"]

Scorer = Callable[["Tensor", "Tensor"], "Tensor"]  # (logits, labels) -> rank of the true class


def default_split_names(count: int) -> tuple[str, ...]:
    """`("test",)` for one dataloader, else `("test_0", "test_1", ...)`."""
    return ("test",) if count == 1 else tuple(f"test_{i}" for i in range(count))


@dataclass(frozen=True)
class TestSplit:
    """One test split (one dataloader).

    Attributes:
        name: the split's key in the results (`test/<name>/<metric>`, `results.json`).
        scorer: `(logits, labels) -> rank of the true class` (a benchmark's protocol, e.g. ImageNet-A's 200-class
            subset of the 1000 logits); None ranks over all of the model's classes.
        label_names: names of this split's labels when they are not the model's outputs (a benchmark's own class
            list); None: the labels are indices into `TestPlan.class_names`.
        is_benchmark: one of the named benchmarks (`data.benchmarks`), not a `data.test_root` folder.
        imagenet_logits: its scorer reads ImageNet-1k logits, so the model needs a 1000-class head.
    """

    __test__ = False  # not a pytest test class

    name: str
    scorer: Scorer | None = None
    label_names: tuple[str, ...] | None = None
    is_benchmark: bool = False
    imagenet_logits: bool = False


@dataclass(frozen=True)
class TestPlan:
    """The test splits a data module provides, and how its images are labelled and normalised.

    Attributes:
        splits: the test splits in dataloader order (empty before the data module has set up its test stage).
        class_names: names of the model's outputs (the data's label space); None: classes by index.
        group_names: group id -> name from the metadata, for per-group accuracy and WGA (empty: no groups).
        data_config: the timm data config the images are normalised with (`input_size`, `mean`, `std`, ...);
            None: the model's own.
    """

    __test__ = False  # not a pytest test class

    splits: tuple[TestSplit, ...] = (TestSplit("test"),)
    class_names: tuple[str, ...] | None = None
    group_names: Mapping[int, str] = field(default_factory=dict)
    data_config: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        names = [s.name for s in self.splits]
        if len(set(names)) != len(names):
            raise ValueError(f"TestPlan: split names must be unique, got {names}")
        object.__setattr__(self, "splits", tuple(self.splits))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "group_names", dict(self.group_names))  # a copy: the caller's dict may change
        if self.data_config is not None:
            object.__setattr__(self, "data_config", dict(self.data_config))

    @classmethod
    def default(cls, loaders: int = 1) -> TestPlan:
        """The plan of a data module that describes nothing: one split per dataloader, named by position."""
        return cls(splits=tuple(TestSplit(name) for name in default_split_names(loaders)))

    @property
    def split_names(self) -> list[str]:
        return [s.name for s in self.splits]

    def for_loaders(self, loaders: int) -> TestPlan:
        """This plan if it has one split per dataloader; else the same label space and normalisation with the
        splits named by position (`test`, `test_0`, ...) and scored over all classes (a data module whose test
        dataloaders differ from the splits it described)."""
        if len(self.splits) == loaders:
            return self
        return replace(self, splits=tuple(TestSplit(name) for name in default_split_names(loaders)))

    @property
    def first_label_names(self) -> tuple[str, ...] | None:
        """Names of the first split's labels (the images `overlays.png` shows): its own list, else the outputs'."""
        return (self.splits[0].label_names if self.splits else None) or self.class_names


@runtime_checkable
class DescribesTests(Protocol):
    """A data module that describes its test splits (`GuidanceDataModule` does)."""

    def test_plan(self) -> TestPlan:
        """The plan, complete once the data module has set up its test stage."""
        ...


def plan_of(datamodule: object | None) -> TestPlan | None:
    """The one hand-off point from data to model: the data module's `TestPlan`, or None when it describes none
    (then callers use `TestPlan.default` and the model's own data config)."""
    if isinstance(datamodule, DescribesTests):
        plan = datamodule.test_plan()
        if not isinstance(plan, TestPlan):
            raise TypeError(f"{type(datamodule).__name__}.test_plan() must return a TestPlan, got "
                            f"{type(plan).__name__}")
        return plan
    return None

