"""Every notebook's code cells run top to bottom (in a temporary working directory, headless)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", ["notebook"])
    (tmp_path / "configs").symlink_to(path.parents[1] / "configs")
    monkeypatch.chdir(tmp_path)
    if path.stem == "demo_results":  # reads a demo run: make a tiny one where the notebook looks
        from cft_lightning.cli import main

        main(["demo", "--out", "runs/demo", "--data_dir", "data", "--methods", "plain", "cft", "--overlays", "2",
              "--num_classes", "3", "--image_size", "32", "--train_per_class", "12", "--test_per_class", "6",
              "--pretrain_epochs", "1", "--finetune_epochs", "1", "--images_per_class", "2", "--no_progress"])
    if path.stem == "sweep_analysis":  # reads a sweep: run the 2-run smoke sweep where the notebook looks
        from cft_lightning.cli import main
        from cft_lightning.smoke_data import generate

        generate("runs/smoke_data", classes=4, per_class=6, size=64, seed=0)
        main(["sweep", "configs/sweeps/smoke_lr.yaml", "--trainer.enable_progress_bar=false"])
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}[code cell {i}]", "exec"), namespace)  # noqa: S102
    if path.stem == "quickstart":
        assert os.path.isdir(tmp_path / "runs" / "notebook")
        results = namespace["results"]
        assert {"test/test_ood/acc1", "test/test_ood/ref_acc1"} <= set(results)
        assert namespace["tuned"].shape == namespace["original"].shape
        assert namespace["before"].maps.shape[0] == 1
    if path.stem == "sweep_analysis":
        assert len(namespace["rows"]) == 2 and set(namespace["deltas"]) == {"test"}
    if path.stem == "demo_results":
        assert namespace["rows"] and namespace["worst"], "the notebook found runs and groups to show"
