"""The test splits as an explicit object (issue 18, item 4): the data module describes them in a `TestPlan`, the
model receives it in `setup` (`plan_of`, the one hand-off) and builds its `Evaluation` from it; a data module
that describes nothing gets the default plan. No mixin and no attribute probe carries the flow."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cft_lightning.data.datamodule import GuidanceDataModule
from cft_lightning.evaluation.test_plan import TestPlan, TestSplit, plan_of
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import PlainFineTuning
from cft_lightning.smoke_data import generate

PACKAGE = Path(__file__).resolve().parents[1] / "cft_lightning"
CONFIG = {"input_size": (3, 16, 16), "mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7), "interpolation": "bilinear",
          "crop_pct": 1.0}


def tiny_model(num_classes: int = 3) -> GuidedFineTuner:
    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                        model_kwargs={"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 24, "num_heads": 2})
    return GuidedFineTuner(spec, PlainFineTuning(), None, lr=1e-3)


class PlainData(L.LightningDataModule):
    """A data module that describes nothing: `loaders` test dataloaders of 6 random images each."""

    def __init__(self, loaders: int = 1) -> None:
        super().__init__()
        self.loaders = loaders

    def test_dataloader(self) -> Any:
        g = torch.Generator().manual_seed(0)
        items = [{"image": torch.randn(3, 16, 16, generator=g), "label": i % 3, "group": i % 2} for i in range(6)]
        loaders = [DataLoader(items, batch_size=3) for _ in range(self.loaders)]
        return loaders[0] if self.loaders == 1 else loaders


class DescribedData(PlainData):
    """The same images, described: one split named `ood`, ranked by a scorer that always hits, two groups."""

    def __init__(self, class_names: list[str] | None = None) -> None:
        super().__init__(1)
        self.class_names = class_names

    def test_plan(self) -> TestPlan:
        def always_right(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(labels)

        return TestPlan(splits=(TestSplit("ood", scorer=always_right),), class_names=self.class_names,
                        group_names={0: "even", 1: "odd"}, data_config=CONFIG)


def run_test(model: GuidedFineTuner, data: L.LightningDataModule, root: Path) -> tuple[dict, dict]:
    trainer = L.Trainer(accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    logged = trainer.test(model, datamodule=data, verbose=False)
    return json.loads((root / "results.json").read_text())["splits"], logged[0]


def test_plan_defaults_and_reconciling_with_the_dataloaders() -> None:
    assert TestPlan().split_names == TestPlan.default().split_names == ["test"]
    assert TestPlan.default(3).split_names == ["test_0", "test_1", "test_2"]
    scorer = torch.argmax
    plan = TestPlan(splits=(TestSplit("a", scorer=scorer), TestSplit("b")), class_names=["x", "y"],
                    group_names={1: "g"}, data_config=CONFIG)
    assert plan.for_loaders(2) is plan and plan.class_names == ("x", "y")
    other = plan.for_loaders(1)  # a data module whose loaders differ from its splits: named by position
    assert other.split_names == ["test"] and other.splits[0].scorer is None
    assert other.class_names == plan.class_names and other.group_names == {1: "g"} and other.data_config == CONFIG
    with pytest.raises(ValueError, match="unique"):
        TestPlan(splits=(TestSplit("a"), TestSplit("a")))
    with pytest.raises(AttributeError):
        plan.splits = ()  # type: ignore[misc]  # frozen


def test_plan_of_is_the_data_modules_description_or_none() -> None:
    assert plan_of(None) is None and plan_of(PlainData()) is None
    assert plan_of(DescribedData()).split_names == ["ood"]

    class Wrong(PlainData):
        def test_plan(self) -> dict:
            return {"splits": ["x"]}

    with pytest.raises(TypeError, match="must return a TestPlan"):
        plan_of(Wrong())


def test_guidance_datamodule_describes_its_test_splits(tmp_path: Path) -> None:
    data = generate(tmp_path / "data", classes=3, per_class=2, size=16, seed=0)
    images = data / "images"
    dm = GuidanceDataModule(str(images / "train"), masks=str(data / "masks"), data_config=CONFIG,
                            metadata=str(data / "metadata.csv"), class_fraction=1.0,
                            test_root={"b": str(images / "test"), "a": str(images / "val")})
    before = dm.test_plan()
    assert before.splits == () and before.data_config == CONFIG  # the splits come with setup("test")
    dm.setup("test")
    plan = dm.test_plan()
    assert plan.split_names == dm.test_split_names == ["b", "a"]  # the mapping's order, not sorted
    assert all(s.scorer is None and s.label_names is None and not s.is_benchmark for s in plan.splits)
    assert plan.class_names == tuple(dm.class_names) and plan.group_names == dm.group_names != {}
    assert plan.data_config == CONFIG


def test_a_plain_datamodule_gets_the_default_plan(tmp_path: Path) -> None:
    splits, logged = run_test(tiny_model(), PlainData(), tmp_path / "one")
    assert list(splits) == ["test"] and "test/acc1" in logged and "test/ref_acc1" in logged
    assert splits["test"]["groups"] == {}  # no description, no groups
    splits, logged = run_test(tiny_model(), PlainData(loaders=2), tmp_path / "two")
    assert list(splits) == ["test_0", "test_1"] and "test/test_1/acc1" in logged


def test_the_model_evaluates_what_the_plan_describes(tmp_path: Path) -> None:
    model = tiny_model()
    splits, logged = run_test(model, DescribedData(), tmp_path)
    assert list(splits) == ["ood"]
    assert splits["ood"]["metrics"]["acc1"] == {"original": 1.0, "fine_tuned": 1.0, "delta": 0.0}  # its scorer
    assert set(splits["ood"]["groups"]) == {"even", "odd"} and logged["test/acc1"] == 1.0
    assert model.evaluation.plan is model.test_plan  # the plan handed over in setup, one split per loader


def test_the_plans_class_list_is_checked_against_the_head(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the data has 5 classes but the backbone head has 3"):
        run_test(tiny_model(3), DescribedData(class_names=list("abcde")), tmp_path)


def test_no_mixin_and_no_attribute_probe_carries_the_test_flow() -> None:
    from cft_lightning.data import benchmark_splits

    assert GuidedFineTuner.__bases__ == (L.LightningModule,)
    assert [c.__name__ for c in GuidanceDataModule.__mro__ if "Benchmark" in c.__name__] == []
    assert not hasattr(benchmark_splits, "BenchmarkTestSplits")
    described = "test_split_names|group_names|test_scorers|class_names|data_config|benchmark_splits|num_classes"
    probe = re.compile(rf"getattr\(\s*[\w.]*datamodule[\w.]*\s*,\s*\"({described})\"|"
                       r"getattr\(\s*(self\.)?_?trainer\s*,\s*\"datamodule\"")
    found = [f"{p.relative_to(PACKAGE)}: {m.group(0)}" for p in PACKAGE.rglob("*.py")
             for m in probe.finditer(p.read_text(encoding="utf-8"))]
    assert not found, found
