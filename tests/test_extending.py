"""A new method is one file and one YAML snippet (issue 18, item 6): the file and the snippet of docs/extending.md,
written into a temporary folder outside the package, drive `cft fit`, `cft test`, `cft explain`, `cft demo` and
the contract tests, by class path and, with CFT_PLUGINS, by their registered names. Every command runs in a
subprocess with the folder on PYTHONPATH, as a user's shell would."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cft_lightning.smoke_data import generate

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
RELEVANCE, REGULARIZER = "my_methods.SquaredInputXGradient", "my_methods.OutsideObjectGradient"
DEMO = ["--num_classes", "3", "--image_size", "32", "--train_per_class", "12", "--test_per_class", "6",
        "--pretrain_epochs", "1", "--shortcut_epochs", "1", "--finetune_epochs", "1", "--images_per_class", "2",
        "--no_progress", "--overlays", "0"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", DOC.read_text(encoding="utf-8"), flags=re.M | re.S)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the package with docs/extending.md's `my_methods.py` and `my_methods.yaml`."""
    python, yaml = _blocks("python"), _blocks("yaml")
    assert len(python) == 1 and len(yaml) == 1, "docs/extending.md: one python and one yaml block"
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "my_methods.py").write_text(python[0], encoding="utf-8")
    (folder / "my_methods.yaml").write_text(yaml[0], encoding="utf-8")
    return folder


def cft(plugin: Path, *args: str, plugins: bool = False, timeout: float = 300) -> str:
    """Run `cft <args>` in a new process with the plugin folder on PYTHONPATH (and CFT_PLUGINS=my_methods when
    `plugins`); its stdout, or the failure with its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin), str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("CFT_PLUGINS", None)
    if plugins:
        env["CFT_PLUGINS"] = "my_methods"
    command = [sys.executable, "-m", "cft_lightning", *args] if args[0] != "pytest" else [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args[1:]]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def fitted(plugin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`cft fit --config configs/smoke.yaml --config my_methods.yaml` on tiny smoke data: the new regularizer
    trains, the new relevance method is the run's."""
    root = tmp_path_factory.mktemp("fit")
    data = generate(root / "data", classes=3, per_class=2, size=32, seed=1)
    common = ["--config", str(REPO / "configs" / "smoke.yaml"), "--config", str(plugin / "my_methods.yaml"),
              "--data.root", str(data / "images" / "train"), "--data.masks", str(data / "masks"),
              "--data.val_root", str(data / "images" / "val"), "--data.test_root", str(data / "images" / "test"),
              "--model.backbone.num_classes", "3",
              "--model.backbone.model_kwargs", '{"img_size": 32, "patch_size": 8, "depth": 2}',
              "--trainer.default_root_dir", str(root / "runs"), "--trainer.logger.init_args.save_dir",
              str(root / "runs"), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    cft(plugin, "fit", *common)
    return {"root": root, "data": data, "ckpt": next((root / "runs").rglob("last.ckpt")),
            "common": common}  # type: ignore[dict-item]


def test_fit_trains_with_the_new_regularizer_and_test_measures_with_the_new_relevance_method(
        plugin: Path, fitted: dict) -> None:
    metrics = next((fitted["root"] / "runs").rglob("metrics.csv"))
    with open(metrics, newline="") as fh:
        penalties = [float(v) for row in csv.DictReader(fh) for k, v in row.items() if k.startswith("train/outside")
                     and v]
    assert penalties and all(math.isfinite(p) and p > 0 for p in penalties), penalties  # the penalty ran
    config = next((fitted["root"] / "runs").rglob("config.yaml")).read_text()
    assert f"class_path: {REGULARIZER}" in config and "weight: 10.0" in config
    assert f"class_path: {RELEVANCE}" in config and "concept_weight" not in config  # the smoke CFT args left

    runs = fitted["root"] / "test_runs"
    common = [a if a != str(fitted["root"] / "runs") else str(runs) for a in fitted["common"]]
    cft(plugin, "test", *common, "--ckpt_path", str(fitted["ckpt"]))
    results = json.loads(next(runs.rglob("results.json")).read_text())
    assert results["run"]["relevance"] == RELEVANCE
    for key in ("pixel_acc", "concept_share"):  # the new method explained both models in test_step
        assert set(results["splits"]["test"]["metrics"][key]) >= {"fine_tuned", "original"}
    assert next(runs.rglob("overlays.png")).is_file()


def test_fit_takes_the_short_class_names_once_cft_plugins_imported_the_module(plugin: Path) -> None:
    printed = cft(plugin, "fit", "--config", str(REPO / "configs" / "smoke.yaml"), "--model.regularizer",
                  "OutsideObjectGradient", "--model.relevance", "SquaredInputXGradient", "--print_config",
                  plugins=True)
    assert f"class_path: {REGULARIZER}" in printed and f"class_path: {RELEVANCE}" in printed


def test_explain_by_class_path_and_by_registered_name(plugin: Path, fitted: dict, tmp_path: Path) -> None:
    images = fitted["data"] / "images" / "test"
    pictures = {}
    for spec, plugins in ((RELEVANCE, False), ("ixg_squared", True)):
        out = tmp_path / spec
        cft(plugin, "explain", "--ckpt", str(fitted["ckpt"]), "--images", str(images), "--method", spec,
            "--out", str(out), "--no_progress", plugins=plugins)
        record = json.loads((out / "explain.json").read_text())
        assert record["method"] == spec and len(record["images"]) == 6
        pictures[spec] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
        assert len(pictures[spec]) == 6
    assert pictures[RELEVANCE] == pictures["ixg_squared"]


def test_demo_by_class_path_and_by_registered_name(plugin: Path, tmp_path: Path) -> None:
    out, data = tmp_path / "demo", tmp_path / "data"
    cft(plugin, "demo", "--out", str(out), "--data_dir", str(data), "--methods", REGULARIZER,
        f"cft+{RELEVANCE}", *DEMO)
    cft(plugin, "demo", "--out", str(out), "--data_dir", str(data), "--methods", "outside_object",
        "cft+ixg_squared", *DEMO, plugins=True)  # the same starting model (cached in --data_dir)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]["0"]) == ["outside_object", "cft+ixg_squared"]
    methods = [REGULARIZER, f"cft+{RELEVANCE}", "outside_object", "cft+ixg_squared"]
    for method in methods:  # a folder per entry, as written
        results = json.loads((out / "seed_0" / method / "results.json").read_text())
        assert results["splits"]["test_ood"]["num_images"] == 18
    by_path = json.loads((out / "seed_0" / REGULARIZER / "results.json").read_text())["splits"]
    by_name = json.loads((out / "seed_0" / "outside_object" / "results.json").read_text())["splits"]
    assert by_path == by_name  # one method, two ways to name it: the same fine-tuning
    rows = [line.split("|")[1].strip() for line in (out / "summary.md").read_text().split("\n\n")[0].splitlines()[2:]]
    assert rows == ["original", "outside_object", "cft+ixg_squared"]


def test_the_contract_tests_pick_the_new_methods_up(plugin: Path) -> None:
    output = cft(plugin, "pytest", "tests/test_relevance_base.py", "tests/test_regularizer_contract.py",
                 "-k", "ixg_squared or outside_object", plugins=True)
    passed = int(re.search(r"(\d+) passed", output).group(1))
    assert passed == 3 + 4 * 2 and "failed" not in output, output  # 3 regularizer tests, 4 relevance tests x 2 families
