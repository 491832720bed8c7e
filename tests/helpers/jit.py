"""Driving the Trainer's just-in-time checkpoint (transformers 5.x ``enable_jit_checkpoint``) in a test."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from transformers import TrainerCallback, TrainingArguments

needs_jit = pytest.mark.skipif(
    "enable_jit_checkpoint" not in TrainingArguments.__dataclass_fields__,
    reason="this transformers has no just-in-time checkpoint (enable_jit_checkpoint)",
)


class SigtermAt(TrainerCallback):
    """Sends this process SIGTERM during optimizer step ``step`` and waits until the Trainer's just-in-time
    checkpoint handler has taken it (its grace period).  ``when="before-switch"``: right after the optimizer
    step, so the checkpoint is saved at that step's end, before LayerScheduleCallback's switch;
    ``"after-switch"``: at the step's end, so it is saved as the next step begins, after the switch."""

    def __init__(self, trainer_holder, step, when):
        self.holder, self.step, self.when = trainer_holder, step, when

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.when == "before-switch" and state.global_step == self.step - 1:
            self._sigterm()

    def on_step_end(self, args, state, control, **kwargs):
        if self.when == "after-switch" and state.global_step == self.step:
            self._sigterm()

    def _sigterm(self):
        jit = [cb for cb in self.holder[0].callback_handler.callbacks if type(cb).__name__ == "JITCheckpointCallback"]
        manager = jit[0].jit_manager
        waited = threading.Event()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            if manager.is_checkpoint_requested or waited.wait(0.05):
                break
        assert manager.is_checkpoint_requested
