"""Faults: `cft fit` killed with SIGKILL at three points, then rerun with `--ckpt_path last`, ends with weights
identical to an uninterrupted run (CPU, seed_everything, epochs reseeded by EpochSeed)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cft_lightning.smoke_data import generate
from cft_lightning.tracking import find_run_summary

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("faults") / "data", classes=3, per_class=3, size=32, seed=1)


def fit(data: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cft_lightning", "fit", "--config", str(ROOT / "configs" / "smoke.yaml"),
               f"--data.root={data / 'images' / 'train'}", f"--data.masks={data / 'masks'}",
               f"--data.val_root={data / 'images' / 'val'}", f"--data.test_root={data / 'images' / 'test'}",
               "--model.backbone.num_classes=3",
               '--model.backbone.model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}',
               f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
               "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false", *extra]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=root.parent, env=env, capture_output=True, text=True, timeout=600)


def final(root: Path) -> dict:
    newest = max(root.rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return torch.load(newest, map_location="cpu", weights_only=True)


@pytest.mark.slow  # 7 short fits in subprocesses (about 45 s)
def test_killed_fit_resumes_to_identical_weights(smoke: Path, tmp_path: Path):
    reference_root = tmp_path / "uninterrupted"
    reference_root.mkdir()
    proc = fit(smoke, reference_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = final(reference_root)
    total = reference["global_step"]
    assert total >= 6, total
    for step in (2, total // 2 + 1, total - 1):  # in the first epoch (no checkpoint yet), mid-run, near the end
        root = tmp_path / f"killed_at_{step}"
        root.mkdir()
        killed = fit(smoke, root, "--trainer.callbacks+=_faults.KillAtStep", f"--trainer.callbacks.step={step}")
        assert killed.returncode == -9, killed.stderr[-2000:]
        resumed = fit(smoke, root, "--ckpt_path=last")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert ("resuming from" in resumed.stderr) == (step > total // 3), resumed.stderr[-500:]
        state = final(root)
        assert state["global_step"] == total
        assert state["state_dict"].keys() == reference["state_dict"].keys()
        for key, value in reference["state_dict"].items():
            assert torch.equal(state["state_dict"][key], value), (step, key)


def _python(call: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", f"import _faults; _faults.{call}"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # subprocesses
def test_killed_mask_generation_and_critique_resume_without_duplicates_or_partial_files(tmp_path: Path):
    """SIGKILL in the middle of `cft masks generate` and of `cft critique`, then rerun: every image's files exist
    once, none is partial (each PNG decodes), the logs hold each image once as written."""
    import json

    import numpy as np
    import timm
    from PIL import Image

    from cft_lightning.benchmarks import ShortcutPartsSpec, build_shortcut_parts
    from cft_lightning.critique.stage import read_jsonl

    spec = ShortcutPartsSpec(num_classes=3, image_size=32, train_per_class=5, val_per_class=1, test_per_class=1,
                             decoy=True, background_shortcut=False)
    data = build_shortcut_parts(tmp_path / "sp", spec, progress=False)
    store = tmp_path / "masks"
    killed = _python(f"ground_masks({str(data)!r}, {str(store)!r}, kill_at=7)", tmp_path)
    assert killed.returncode == -9, killed.stderr[-1500:]
    assert _python(f"ground_masks({str(data)!r}, {str(store)!r})", tmp_path).returncode == 0
    records = [json.loads(line) for line in (store / "logs" / "rank_0.jsonl").read_text().splitlines()]
    written = [r["image"] for r in records if not r["skipped"]]
    assert sorted(written) == sorted(f"{c}/train_{i:04d}.png" for c in ("alpha", "beta", "gamma") for i in range(5))
    for png in store.rglob("*.png"):
        np.asarray(Image.open(png))  # decodes: no partial file
    assert not list(store.rglob("*.tmp*"))

    torch.manual_seed(0)
    weights = tmp_path / "cnn.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    critic_store = tmp_path / "critic"
    killed = _python(f"critique({str(data)!r}, {str(weights)!r}, {str(critic_store)!r}, kill_at=4)", tmp_path)
    assert killed.returncode == -9, killed.stderr[-1500:]
    done_before = {r["image"] for r in read_jsonl(critic_store / "critique" / "records")}
    assert len(done_before) == 3  # the 4th critique died before its mask and record
    assert _python(f"critique({str(data)!r}, {str(weights)!r}, {str(critic_store)!r})", tmp_path).returncode == 0
    records = read_jsonl(critic_store / "critique" / "records")
    assert len(records) == 6 and len({r["image"] for r in records}) == 6  # 3 before, 3 after: none twice
    assert len(read_jsonl(critic_store / "critique" / "entropy")) == 15  # scored once, not again
    assert json.loads((critic_store / "critique" / "summary.json").read_text())["masks_written"] == 6
    for png in critic_store.rglob("*.png"):
        np.asarray(Image.open(png))


@pytest.mark.slow  # a 2-run sweep, killed and rerun
def test_killed_sweep_leaves_no_orphan_and_reruns_to_completion(tmp_path: Path):
    """SIGKILL the `cft sweep` runner while its second run trains: the run dies with it (no orphan keeps writing),
    and the rerun skips the finished run and completes the other."""
    import json
    import signal
    import time

    data = generate(tmp_path / "data", classes=3, per_class=3, size=32, seed=1)
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "cft_lightning", "sweep", str(ROOT / "configs" / "sweeps" / "smoke_lr.yaml"),
               "--out", str(out), f"--data.root={data / 'images' / 'train'}", f"--data.masks={data / 'masks'}",
               f"--data.val_root={data / 'images' / 'val'}", f"--data.test_root={data / 'images' / 'test'}",
               "--model.backbone.num_classes=3",
               '--model.backbone.model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}',
               f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--trainer.max_epochs=10",
               "--trainer.enable_progress_bar=false"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    runner = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "001-lr=0.001"
    deadline = time.time() + 300
    while not (second / "sweep_run.log").exists() or "TPU available" not in (second / "sweep_run.log").read_text():
        assert runner.poll() is None and time.time() < deadline, "the sweep ended before its second run started"
        time.sleep(0.2)
    time.sleep(1.0)  # into its training (10 epochs take several seconds)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    time.sleep(2)
    orphans = subprocess.run(["pgrep", "-f", f"default_root_dir={second}"], capture_output=True, text=True).stdout
    assert not orphans.strip(), f"an orphaned run survived the runner: {orphans}"
    assert not list(second.rglob("run_summary.json"))
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    record = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["skipped (finished before)", "finished"]
    for run in record["runs"]:
        summary = json.loads(find_run_summary(run["dir"]).read_text())
        assert summary["fit"]["status"] == summary["test"]["status"] == "finished"


@pytest.mark.slow  # two fits in subprocesses, one of them on 2 processes
def test_ddp_fit_equals_the_one_process_fit(tmp_path: Path):
    """2 gloo processes with batch 2 against 1 process with batch 4: the same samples in every global step
    (EpochShuffleSampler), the same augmentation per sample, averaged gradients: the same weights and the same
    validation accuracy."""
    data = generate(tmp_path / "data", classes=3, per_class=4, size=32, seed=1)
    (tmp_path / "plain.yaml").write_text(
        "model:\n  relevance: null\n  regularizer:\n    class_path: cft_lightning.regularizers.PlainFineTuning\n"
        "    init_args:\n      consistency_target: label\n")
    runs = {}
    for devices, batch in (("1", "4"), ("2", "2")):
        root = tmp_path / f"devices{devices}"
        root.mkdir()
        proc = fit(data, root, "--config", str(tmp_path / "plain.yaml"), "--data.images_per_class=4",
                   f"--data.batch_size={batch}", f"--trainer.devices={devices}", "--trainer.max_epochs=2",
                   *(["--trainer.strategy=ddp"] if devices == "2" else []))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[devices] = final(root)
    one, two = runs["1"], runs["2"]
    assert one["global_step"] == two["global_step"] == 6  # 12 images: 3 global steps per epoch, 2 epochs
    diff = torch.cat([(two["state_dict"][k] - v).flatten() for k, v in one["state_dict"].items()]).abs()
    # Bit-identical but for float-summation noise (the gradient averaging adds in another order). The noise
    # grows only where a gradient is zero in exact arithmetic (the key bias of attention: softmax ignores it),
    # which Adam normalises into lr-sized steps: measured 0.02 % of the values off by > 1e-6, at most 2.4e-5.
    assert diff.median() == 0 and (diff > 1e-6).float().mean() < 1e-3 and diff.max() < 1e-4, diff.max()
    accuracy = {}
    for devices in ("1", "2"):
        with open(next((tmp_path / f"devices{devices}").rglob("metrics.csv"))) as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("val/acc1")]
        accuracy[devices] = [float(r["val/acc1"]) for r in rows]
    assert accuracy["1"] == accuracy["2"] and len(accuracy["1"]) == 2
