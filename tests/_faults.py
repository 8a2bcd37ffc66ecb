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
