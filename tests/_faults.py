"""A callback that kills its own process with SIGKILL at a given training step (kill -9, no cleanup): used by
tests/test_faults.py through `--trainer.callbacks+=_faults.KillAtStep` with `tests/` on PYTHONPATH."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _die_at(n: int):
    count = {"calls": 0}

    def tick() -> None:
        count["calls"] += 1
        if count["calls"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    return tick


def ground_masks(data: str, store: str, kill_at: int = 0) -> None:
    """`cft masks generate`'s Trainer.predict with the oracle grounder; SIGKILL at the kill_at-th image (0: never)."""
    import lightning as L

    from cft_lightning.benchmarks.shortcut_parts import class_parts
    from cft_lightning.concepts.validate import OracleGrounder, images_by_class
    from cft_lightning.masks.predict import MaskGeneration, generation_loader

    tick = _die_at(kill_at)

    class Dying(OracleGrounder):
        def __call__(self, rel, class_name, prompts):
            tick()
            return super().__call__(rel, class_name, prompts)

    bank = {cls: list(parts) for cls, parts in class_parts(3).items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=store)
    trainer.predict(MaskGeneration(Dying(f"{data}/masks"), bank, store),
                    generation_loader(images_by_class(f"{data}/images/train"), 2), return_predictions=False)


def critique(data: str, weights: str, store: str, kill_at: int = 0) -> None:
    """`cft critique --critic oracle` on the decoy benchmark's training images; SIGKILL at the kill_at-th critique."""
    import timm
    import torch

    from cft_lightning.critique import CritiqueSettings, OracleCritic, run_critique
    from cft_lightning.critique.attribution import build_attributor
    from cft_lightning.critique.cli import _items

    tick = _die_at(kill_at)

    class Dying(OracleCritic):
        def __call__(self, sample):
            tick()
            return super().__call__(sample)

    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(torch.load(weights, weights_only=True))
    classes = ["alpha", "beta", "gamma"]
    root = f"{data}/images/train"
    run_critique(model, timm.data.resolve_data_config({}, model=model), root, _items(root, classes), classes,
                 build_attributor("ixg", model), Dying(), store, {"*": "x"},
                 CritiqueSettings(samples=6, segments=2, batch_size=2, concurrency=1, progress=False),
                 truth=(f"{data}/masks", "decoy"))
