"""`cft test` evaluation: the `Evaluator` (per split, per model), the results writer (JSON/CSV/markdown/terminal),
the end-to-end test run of `GuidedFineTuner` on the generated shortcut-parts benchmark, and test splits given as a
mapping in `GuidanceDataModule`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
from cft_lightning.data import DataError, GuidanceDataModule
from cft_lightning.evaluation.evaluator import MODELS, Evaluator
from cft_lightning.evaluation.report import SCHEMA, markdown_table, print_table, write_results
from cft_lightning.models import BackboneSpec, GuidedFineTuner
from cft_lightning.regularizers import CFT
from cft_lightning.relevance import AttnLRP

NUM_CLASSES = 3
ALIGNMENT = ("pixel_acc", "miou", "map")
GROUP_METRICS = ("worst_group_acc", "mean_group_acc")


# --------------------------------------------------------------------------------------------------
# helpers


def logits_for(preds: list[int]) -> Tensor:
    """Logits whose argmax is `preds` (and whose top-3 of 3 classes is always right)."""
    return 5.0 * F.one_hot(torch.tensor(preds), NUM_CLASSES).float()


def batch(labels: list[int], groups: list[int] | None = None, object_mask: Tensor | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"label": torch.tensor(labels)}
    if groups is not None:
        out["group"] = torch.tensor(groups)
    if object_mask is not None:
        out["masks"] = {"object": object_mask, "concept": torch.zeros_like(object_mask)}
    return out


def square_masks(n: int, size: int = 8) -> Tensor:
    masks = torch.zeros(n, size, size)
    masks[:, 2:6, 1:5] = 1.0
    return masks


# --------------------------------------------------------------------------------------------------
# 1. Evaluator


def test_accuracy_per_split_and_model_with_delta() -> None:
    ev = Evaluator(["id", "ood"], NUM_CLASSES)
    labels = [0, 1, 2, 0]
    ev.update(0, "original", logits_for([0, 1, 0, 1]), batch(labels), None)  # 2/4
    ev.update(0, "fine_tuned", logits_for([0, 1, 2, 1]), batch(labels), None)  # 3/4
    ev.update(1, "original", logits_for([1, 1, 1, 1]), batch(labels), None)  # 1/4
    ev.update(1, "fine_tuned", logits_for([2, 2, 2, 0]), batch(labels), None)  # 2/4
    res = ev.results()
    assert list(res) == ["id", "ood"]
    acc_id, acc_ood = res["id"]["metrics"]["acc1"], res["ood"]["metrics"]["acc1"]
    assert acc_id["original"] == pytest.approx(0.5) and acc_id["fine_tuned"] == pytest.approx(0.75)
    assert acc_ood["original"] == pytest.approx(0.25) and acc_ood["fine_tuned"] == pytest.approx(0.5)
    for split in res.values():
        for entry in split["metrics"].values():
            assert set(entry) == {"original", "fine_tuned", "delta"}
            assert entry["delta"] == pytest.approx(entry["fine_tuned"] - entry["original"])
    assert acc_id["delta"] == pytest.approx(0.25)
    assert res["id"]["metrics"]["acc5"] == {"original": 1.0, "fine_tuned": 1.0, "delta": 0.0}  # top-3 of 3
    # no groups, no maps: accuracy only
    assert set(res["id"]["metrics"]) == {"acc1", "acc5"} and res["id"]["groups"] == {}


def test_accuracy_accumulates_over_batches() -> None:
    ev = Evaluator(["s"], NUM_CLASSES)
    for who in MODELS:
        ev.update(0, who, logits_for([0, 0]), batch([0, 1]), None)  # 1/2
        ev.update(0, who, logits_for([1, 2, 0]), batch([1, 2, 0]), None)  # 3/3
    assert ev.results()["s"]["metrics"]["acc1"]["fine_tuned"] == pytest.approx(4 / 5)


def test_num_images_counts_each_image_once_not_once_per_model() -> None:
    ev = Evaluator(["a", "b"], NUM_CLASSES)
    for n in (4, 3):
        for who in MODELS:
            ev.update(0, who, logits_for([0] * n), batch([0] * n), None)
    for who in MODELS:
        ev.update(1, who, logits_for([1, 1]), batch([1, 1]), None)
    res = ev.results()
    assert res["a"]["num_images"] == 7 and res["b"]["num_images"] == 2


def test_unlabelled_images_are_counted_but_excluded_from_accuracy_and_groups() -> None:
    ev = Evaluator(["s"], NUM_CLASSES, {0: "g0", 1: "g1"})
    # the unlabelled image (-1) is "wrong" for every label and sits alone in group 1
    b = batch([0, -1, 1], groups=[0, 1, 0])
    for who in MODELS:
        ev.update(0, who, logits_for([0, 2, 0]), b, None)
    res = ev.results()["s"]
    assert res["num_images"] == 3
    assert res["metrics"]["acc1"]["fine_tuned"] == pytest.approx(1 / 2)  # 1/3 if the -1 image counted
    assert set(res["groups"]) == {"g0"} and res["groups"]["g0"]["count"] == 2


def test_group_metrics_worst_and_unweighted_mean_keyed_by_group_name() -> None:
    names = {0: "land", 1: "water", 2: "never-seen", 4: "unused"}
    ev = Evaluator(["s"], NUM_CLASSES, names)
    # land: 3/3 right; water: 0/1; group 3 (no name): 1/2; group -1: no group (accuracy only)
    labels, groups = [0, 1, 2, 0, 1, 2, 0], [0, 0, 0, 1, 3, 3, -1]
    ev.update(0, "original", logits_for([0, 1, 2, 1, 1, 0, 0]), batch(labels, groups), None)
    ev.update(0, "fine_tuned", logits_for([0, 1, 2, 0, 1, 2, 1]), batch(labels, groups), None)
    res = ev.results()["s"]
    assert set(res["groups"]) == {"land", "water", "3"}  # names where given, else the id; empty groups absent
    assert res["groups"]["land"] == {"count": 3, "original": 1.0, "fine_tuned": 1.0}
    assert res["groups"]["water"] == {"count": 1, "original": 0.0, "fine_tuned": 1.0}
    assert res["groups"]["3"] == {"count": 2, "original": 0.5, "fine_tuned": 1.0}
    m = res["metrics"]
    assert m["worst_group_acc"]["original"] == 0.0 and m["worst_group_acc"]["fine_tuned"] == 1.0
    # unweighted over the three non-empty groups: (1 + 0 + 0.5) / 3, not the sample-weighted 4/6
    assert m["mean_group_acc"]["original"] == pytest.approx(0.5)
    assert m["mean_group_acc"]["fine_tuned"] == pytest.approx(1.0)
    assert m["worst_group_acc"]["delta"] == pytest.approx(1.0) and m["mean_group_acc"]["delta"] == pytest.approx(0.5)
    assert m["acc1"]["original"] == pytest.approx(5 / 7)  # the group -1 image still counts for accuracy


def test_group_metrics_only_when_groups_exist() -> None:
    no_names = Evaluator(["s"], NUM_CLASSES)  # no metadata: groups in the batch are not evaluated
    with_names = Evaluator(["s", "t"], NUM_CLASSES, {0: "a", 1: "b"})
    for who in MODELS:
        no_names.update(0, who, logits_for([0, 1]), batch([0, 1], groups=[0, 1]), None)
        with_names.update(0, who, logits_for([0, 1]), batch([0, 1]), None)  # batch without "group"
        with_names.update(1, who, logits_for([0, 1]), batch([0, 1], groups=[-1, -1]), None)  # no image in a group
        with_names.update(1, who, logits_for([0]), batch([0], groups=[1]), None)
    res = no_names.results()["s"]
    assert not set(GROUP_METRICS) & set(res["metrics"]) and res["groups"] == {}
    res = with_names.results()
    assert not set(GROUP_METRICS) & set(res["s"]["metrics"]) and res["s"]["groups"] == {}
    assert set(GROUP_METRICS) <= set(res["t"]["metrics"]) and set(res["t"]["groups"]) == {"b"}


def test_alignment_only_with_maps_and_object_masks() -> None:
    masks = square_masks(2)
    ev = Evaluator(["maps_no_object", "object_no_maps", "both"], NUM_CLASSES)
    for who in MODELS:
        no_object = {**batch([0, 1]), "masks": {"concept": masks}}
        ev.update(0, who, logits_for([0, 1]), no_object, masks.clone())
        ev.update(1, who, logits_for([0, 1]), batch([0, 1], object_mask=masks), None)
    # the fine-tuned model's maps are the object itself, the original's are its complement
    ev.update(2, "original", logits_for([0, 1]), batch([0, 1], object_mask=masks), 1.0 - masks)
    ev.update(2, "fine_tuned", logits_for([0, 1]), batch([0, 1], object_mask=masks), masks.clone())
    res = ev.results()
    for split in ("maps_no_object", "object_no_maps"):
        assert set(res[split]["metrics"]) == {"acc1", "acc5"}
    both = res["both"]["metrics"]
    assert set(ALIGNMENT) <= set(both)
    for key in ALIGNMENT:
        assert both[key]["fine_tuned"] == pytest.approx(1.0)
        assert both[key]["delta"] == pytest.approx(both[key]["fine_tuned"] - both[key]["original"])
    assert both["pixel_acc"]["original"] == pytest.approx(0.0) and both["miou"]["original"] == pytest.approx(0.0)


def test_reset_clears_everything() -> None:
    ev = Evaluator(["s"], NUM_CLASSES, {0: "a", 1: "b"})
    masks = square_masks(3)
    for who in MODELS:
        ev.update(0, who, logits_for([0, 0, 0]), batch([0, 1, 2], [0, 1, 1], masks), masks.clone())
    before = ev.results()["s"]
    assert before["num_images"] == 3 and set(ALIGNMENT) <= set(before["metrics"])
    ev.reset()
    for who in MODELS:
        ev.update(0, who, logits_for([1, 2]), batch([1, 2], [0, 0]), None)
    after = ev.results()["s"]
    assert after["num_images"] == 2
    assert after["metrics"]["acc1"]["fine_tuned"] == 1.0  # 1/3 before the reset, 3/5 without it
    assert not set(ALIGNMENT) & set(after["metrics"])  # the alignment flag is cleared too
    assert after["groups"] == {"a": {"count": 2, "original": 1.0, "fine_tuned": 1.0}}


def test_model_that_was_not_evaluated_has_no_key() -> None:
    ev = Evaluator(["s"], NUM_CLASSES)
    ev.update(0, "fine_tuned", logits_for([0, 0]), batch([0, 1]), None)  # no reference: no "original" update
    entry = ev.results()["s"]["metrics"]["acc1"]
    assert entry["fine_tuned"] == pytest.approx(0.5)
    assert "original" not in entry and "delta" not in entry


def test_split_without_labels_has_no_accuracy() -> None:
    ev = Evaluator(["s"], NUM_CLASSES)
    for who in MODELS:
        ev.update(0, who, logits_for([0, 1]), batch([-1, -1]), None)
    res = ev.results()["s"]
    assert res["num_images"] == 2 and "acc1" not in res["metrics"]


# --------------------------------------------------------------------------------------------------
# 2. report: results.json / .csv / .md and the terminal table


def payload() -> dict[str, Any]:
    return {
        "run": {"created": "2025-01-01T00:00:00+00:00", "checkpoint": None, "backbone": "vit_tiny_patch16_224",
                "regularizer": "cft_lightning.regularizers.cft.CFT", "relevance": None},
        "splits": {
            "test_id": {
                "num_images": 8,
                "metrics": {
                    "acc1": {"original": 0.5, "fine_tuned": 0.75, "delta": 0.25},
                    "worst_group_acc": {"original": 0.3, "fine_tuned": 0.2, "delta": -0.1},
                    "miou": {"original": 0.123456, "fine_tuned": 0.5, "delta": 0.376544},
                },
                "groups": {"land": {"count": 8, "original": 0.5, "fine_tuned": 0.75}},
            },
            "test_ood": {  # no reference: the original model was not evaluated
                "num_images": 4,
                "metrics": {"acc1": {"fine_tuned": 0.8}, "acc5": {"fine_tuned": 1.0}},
                "groups": {},
            },
        },
    }


def test_write_results_json(tmp_path: Path) -> None:
    paths = write_results(payload(), tmp_path / "run")
    assert paths == {ext: str(tmp_path / "run" / f"results.{ext}") for ext in ("json", "csv", "md")}
    data = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    assert data["schema"] == SCHEMA == "cft_lightning.results/1"
    assert data == {"schema": SCHEMA, **payload()}
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]  # atomic writes cleaned up


def test_write_results_csv_one_row_per_split_and_metric(tmp_path: Path) -> None:
    paths = write_results(payload(), tmp_path, stem="other")
    assert Path(paths["csv"]).name == "other.csv"
    with open(paths["csv"], newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["split", "metric", "original", "fine_tuned", "delta"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("test_id", "acc1"), ("test_id", "worst_group_acc"), ("test_id", "miou"), ("test_ood", "acc1"),
        ("test_ood", "acc5"),
    ]
    assert [float(v) for v in rows[1][2:]] == [0.5, 0.75, 0.25]  # fractions, not x100
    assert rows[4][2:] == ["", "0.8", ""]  # missing original and delta: empty cells


def test_write_results_markdown_x100_with_signed_deltas(tmp_path: Path) -> None:
    paths = write_results(payload(), tmp_path)
    text = Path(paths["md"]).read_text(encoding="utf-8")
    assert text == markdown_table(payload())
    lines = text.splitlines()
    assert lines[0] == "| split | metric | Original | Fine-tuned | Δ |" and lines[1].startswith("|---")
    assert "| test_id | top-1 | 50.00 | 75.00 | +25.00 |" in lines
    assert "| test_id | worst-group acc (WGA) | 30.00 | 20.00 | -10.00 |" in lines
    assert "| test_id | relevance mIoU | 12.35 | 50.00 | +37.65 |" in lines
    assert "| test_ood | top-1 | - | 80.00 | - |" in lines  # no reference: '-' and no delta
    assert "| test_ood | top-5 | - | 100.00 | - |" in lines
    assert len(lines) == 2 + 5


def test_print_table_shows_the_values(capsys: pytest.CaptureFixture[str]) -> None:
    print_table(payload(), title="my run")
    out = capsys.readouterr().out
    for text in ("my run", "test_ood", "top-1", "75.00", "+25.00", "-10.00", "12.35"):
        assert text in out


# --------------------------------------------------------------------------------------------------
# 3. end to end: Trainer.test of a CFT + AttnLRP model on shortcut-parts (test_id and test_ood)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=6, val_per_class=2, test_per_class=6)
    return build_shortcut_parts(tmp_path_factory.mktemp("parts") / "data", spec, progress=False)


def parts_datamodule(root: Path, **overrides: Any) -> GuidanceDataModule:
    kwargs: dict[str, Any] = dict(
        root=str(root / "images" / "train"), masks=str(root / "masks"), mask_kinds=["concept", "object"],
        test_root={"test_id": str(root / "images" / "test_id"), "test_ood": str(root / "images" / "test_ood")},
        metadata=str(root / "metadata.csv"), images_per_class=2, class_fraction=1.0, batch_size=18,
    )
    kwargs.update(overrides)
    return GuidanceDataModule(**kwargs)


def cft_model() -> GuidedFineTuner:
    torch.manual_seed(0)
    backbone = BackboneSpec("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                            model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2})
    return GuidedFineTuner(backbone, CFT(), AttnLRP())


def run_test(tmp: Path, model: GuidedFineTuner, dm: GuidanceDataModule, inference_mode: bool) -> tuple:
    trainer = L.Trainer(accelerator="cpu", devices=1, inference_mode=inference_mode, logger=CSVLogger(tmp),
                        default_root_dir=tmp, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False)
    logged = trainer.test(model, datamodule=dm, verbose=False)
    return trainer, logged


@pytest.fixture(scope="module")
def tested(parts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `trainer.test` with inference_mode=False: alignment is measured."""
    model, dm = cft_model(), parts_datamodule(parts)
    trainer, logged = run_test(tmp_path_factory.mktemp("logs"), model, dm, inference_mode=False)
    return {"model": model, "dm": dm, "trainer": trainer, "logged": logged}


def read_json(trainer: L.Trainer) -> dict[str, Any]:
    return json.loads(Path(trainer.log_dir, "results.json").read_text(encoding="utf-8"))


def test_test_overlays_name_the_true_class_and_each_models_prediction(tested: dict[str, Any], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cft_lightning.evaluation import overlays

    seen: dict[str, Any] = {}

    def capture(images: Any, masks: Any, maps: dict, path: Path, **kwargs: Any) -> Path:
        seen.update(kwargs, maps=maps)
        return path

    monkeypatch.setattr(overlays, "overlay_grid", capture)
    model, dm = tested["model"], tested["dm"]
    model.evaluation.pictures({"splits": {}}, str(tmp_path))
    labels = model.evaluation.overlay_labels
    assert len(labels) == 6 and seen["true_classes"] == [dm.class_names[int(i)] for i in labels]
    assert set(seen["predictions"]) == set(seen["maps"]) == {"original", "fine_tuned"}
    for names in seen["predictions"].values():
        assert len(names) == len(labels) and set(names) <= set(dm.class_names)


def test_test_run_writes_its_files_into_the_log_dir(tested: dict[str, Any]) -> None:
    trainer, model = tested["trainer"], tested["model"]
    log_dir = Path(trainer.log_dir)
    assert log_dir.is_dir() and log_dir != Path(trainer.default_root_dir)  # the logger's version folder
    assert {ext: Path(p) for ext, p in model.results_paths.items()} == {
        **{ext: log_dir / f"results.{ext}" for ext in ("json", "csv", "md")},
        "results_png": log_dir / "results.png", "overlays_png": log_dir / "overlays.png",
    }
    from PIL import Image

    with Image.open(log_dir / "overlays.png") as im:  # a header and one row per image: original | fine-tuned
        assert im.width > 100 and im.height > im.width / 4
    data = read_json(trainer)
    assert data["schema"] == SCHEMA
    assert data["run"]["backbone"] == "vit_tiny_patch16_224"
    assert data["run"]["regularizer"] == "cft_lightning.regularizers.cft.CFT"
    assert data["run"]["checkpoint"] is None and data["run"]["relevance"]
    assert data["splits"] == json.loads(json.dumps(model.test_results))
    with open(log_dir / "results.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == sum(len(s["metrics"]) for s in data["splits"].values()) == 2 * 9  # + concept_share, _area
    md = (log_dir / "results.md").read_text(encoding="utf-8")
    assert "| test_ood | relevance mIoU |" in md and "| test_id | worst-group acc (WGA) |" in md


OOD_GROUPS = {f"{c}|{b}" for c in ("alpha", "beta", "gamma") for b in ("grass", "water", "sand")}


def test_test_run_reports_every_split_with_groups_and_alignment(tested: dict[str, Any]) -> None:
    splits = read_json(tested["trainer"])["splits"]
    assert list(splits) == ["test_id", "test_ood"]
    for name, split in splits.items():
        assert split["num_images"] == 18
        expected = {"acc1", "acc5", *GROUP_METRICS, *ALIGNMENT, "concept_share", "concept_area"}
        assert set(split["metrics"]) == expected, name
        for entry in split["metrics"].values():
            for who in MODELS:
                assert 0.0 <= entry[who] <= 1.0
        # groups come from the metadata CSV, named "<class>|<background>"
        assert set(split["groups"]) <= OOD_GROUPS
        assert sum(g["count"] for g in split["groups"].values()) == 18
        accs = [g["fine_tuned"] for g in split["groups"].values()]
        assert split["metrics"]["worst_group_acc"]["fine_tuned"] == pytest.approx(min(accs))
        assert split["metrics"]["mean_group_acc"]["fine_tuned"] == pytest.approx(sum(accs) / len(accs))
    # out of distribution every class stands on every background equally often: 9 groups of 2
    assert {k: g["count"] for k, g in splits["test_ood"]["groups"].items()} == {g: 2 for g in OOD_GROUPS}


def test_test_run_accuracy_is_that_of_each_split(tested: dict[str, Any]) -> None:
    """Split i of the results is dataloader i: top-1 recomputed by hand per loader."""
    model, dm = tested["model"], tested["dm"]
    splits = read_json(tested["trainer"])["splits"]
    model.eval()
    with torch.no_grad():
        for name, loader in zip(dm.test_split_names, dm.test_dataloader()):
            correct = sum(int((model.backbone(b["image"]).argmax(1) == b["label"]).sum()) for b in loader)
            assert splits[name]["metrics"]["acc1"]["fine_tuned"] == pytest.approx(correct / 18)


def test_untrained_model_equals_its_reference_in_every_metric(tested: dict[str, Any]) -> None:
    """No training happened, so the reference is an exact copy: the side-by-side evaluation must agree."""
    splits = read_json(tested["trainer"])["splits"]
    for split in splits.values():
        for name, entry in split["metrics"].items():
            assert entry["original"] == entry["fine_tuned"], name
            assert entry["delta"] == 0.0, name
        for group in split["groups"].values():
            assert group["original"] == group["fine_tuned"]


def test_test_run_under_inference_mode_skips_alignment_with_a_warning(parts: Path, tmp_path: Path) -> None:
    model, dm = cft_model(), parts_datamodule(parts)
    with pytest.warns(UserWarning, match="relevance alignment is skipped"):
        trainer, _ = run_test(tmp_path, model, dm, inference_mode=True)
    splits = read_json(trainer)["splits"]
    assert list(splits) == ["test_id", "test_ood"]
    for split in splits.values():
        assert not set(ALIGNMENT) & set(split["metrics"])
        assert {"acc1", "acc5", *GROUP_METRICS} <= set(split["metrics"])
        assert split["metrics"]["acc1"]["delta"] == 0.0
    md = Path(trainer.log_dir, "results.md").read_text(encoding="utf-8")
    assert "top-1" in md and "relevance" not in md


def test_logged_accuracy_per_dataloader_matches_the_results(tested: dict[str, Any]) -> None:
    splits = read_json(tested["trainer"])["splits"]
    for idx, (name, logged) in enumerate(zip(["test_id", "test_ood"], tested["logged"])):
        metrics = splits[name]["metrics"]
        assert logged[f"test/{name}/acc1"] == pytest.approx(metrics["acc1"]["fine_tuned"]), idx
        assert logged[f"test/{name}/ref_acc1"] == pytest.approx(metrics["acc1"]["original"]), idx


def test_run_relevance_is_a_class_path(tested: dict[str, Any]) -> None:
    assert read_json(tested["trainer"])["run"]["relevance"] == f"{AttnLRP.__module__}.{AttnLRP.__qualname__}"


# --------------------------------------------------------------------------------------------------
# 4. GuidanceDataModule with test_root as a mapping


def test_missing_test_folder_is_named_by_its_split(parts: Path) -> None:
    good = str(parts / "images" / "test_id")
    with pytest.raises(DataError, match=r"data\.test_root\.ood: .*nope does not exist"):
        parts_datamodule(parts, test_root={"id": good, "ood": str(parts / "nope")})
    with pytest.raises(DataError, match=r"data\.test_root\.csv: .* must be a directory"):
        parts_datamodule(parts, test_root={"id": good, "csv": str(parts / "metadata.csv")})
    with pytest.raises(DataError, match=r"data\.test_root: .*nope does not exist"):
        parts_datamodule(parts, test_root=str(parts / "nope"))


def test_test_split_names_follow_the_mapping_order(parts: Path) -> None:
    folders = {"ood": parts / "images" / "test_ood", "id": parts / "images" / "test_id"}  # not sorted
    dm = parts_datamodule(parts, test_root={k: str(v) for k, v in folders.items()},
                          data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                       "crop_pct": 1.0})
    assert dm.test_split_names == ["ood", "id"]
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    assert [Path(loader.dataset.root) for loader in loaders] == list(folders.values())
    assert parts_datamodule(parts, test_root=str(folders["id"])).test_split_names == ["test"]
    assert parts_datamodule(parts, test_root=None).test_split_names == ["test"]



def test_scorer_and_class_split_accuracies():
    """A split's scorer (a benchmark protocol) decides the hits; `class_split` adds seen / held-out accuracy."""
    from cft_lightning.benchmarks.robustness import target_rank
    from cft_lightning.evaluation.evaluator import Evaluator

    columns = torch.tensor([2, 5])  # a 2-class subset of a 6-class head
    ev = Evaluator(["sub", "all"], 6, scorers=[lambda z, y: target_rank(z, y, columns), None])
    logits = torch.tensor([[0.0, 0, 1, 0, 0, 9], [9.0, 0, 1, 0, 0, 0], [0.0, 0, 0, 0, 0, 1]])
    labels_sub = torch.tensor([1, 0, 1])  # positions in `columns`: 5, 2, 5
    batch = {"label": labels_sub, "class_split": torch.tensor([1, 0, -1])}
    for who in ("original", "fine_tuned"):
        ev.update(0, who, logits, batch, None)
        ev.update(1, who, logits, {"label": torch.tensor([5, 2, 5])}, None)
    res = ev.results()
    # restricted to columns 2 and 5 every row's argmax is its label; over all 6 classes row 1 (label 2) misses
    assert res["sub"]["metrics"]["acc1"]["fine_tuned"] == 1.0
    assert res["all"]["metrics"]["acc1"]["fine_tuned"] == pytest.approx(2 / 3)
    assert res["sub"]["metrics"]["acc1_seen"]["original"] == 1.0
    assert res["sub"]["metrics"]["acc1_held_out"]["original"] == 1.0
    assert "acc1_seen" not in res["all"]["metrics"]
