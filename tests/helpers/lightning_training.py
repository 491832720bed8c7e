"""Shared pieces of the real Lightning runs (tests/test_lightning.py, helpers/lightning_worker.py): a
LightningModule around a scheduled BERT, a recorder of each optimizer step, an in-memory logger.

Imports lightning: import this module only where lightning is installed.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from peft_layersched import LayerScheduler

from helpers import toy_training
from helpers.snapshots import layer_hashes
from helpers.toy_training import ToyClassification

LAYERS = 4
BATCH = 4


def scheduled_bert(schedule, unit):
    """A 4-layer scheduled BERT without any dropout: Lightning checkpoints hold no RNG state, so only a
    run without randomness resumes bitwise."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return toy_training.scheduled_bert(schedule, unit, dropout=0.0, num_layers=LAYERS, base_fields=no_dropout)


def loader(n=16):
    return DataLoader(ToyClassification(n=n), batch_size=BATCH, shuffle=False)


class ScheduledModule(pl.LightningModule):
    """The scheduled PeftModel as ``self.model``; AdamW over ``LayerScheduler.param_groups`` and a linear
    LR decay stepped every optimizer step."""

    def __init__(self, peft_model, lr=1e-2):
        super().__init__()
        self.model = peft_model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(LayerScheduler.param_groups(self.model), lr=self.lr, weight_decay=0.1)
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 100.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


class Recorder(pl.Callback):
    """After each optimizer step (listed after LayerScheduleFinetuning): the step, the layers that train
    next, and each layer's LoRA weights hash as that step left them; ``steps[0]``: before the first."""

    def __init__(self):
        self.steps = []
        self._last = None

    def on_train_start(self, trainer, pl_module):
        self._last = trainer.global_step
        self.steps.append({"step": trainer.global_step, "active": pl_module.model.active_layers,
                           "hashes": layer_hashes(pl_module.model)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self.steps.append({"step": trainer.global_step, "active": pl_module.model.active_layers,
                               "hashes": layer_hashes(pl_module.model)})


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call (a real Lightning logger, writing nowhere)."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def trainer(root, callbacks, logger=False, **options):
    """A quiet 1-process CPU Trainer (checkpoints only where a ModelCheckpoint is among ``callbacks``)."""
    kwargs = dict(
        accelerator="cpu", devices=1, default_root_dir=str(root), logger=logger, log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        enable_checkpointing=any(isinstance(cb, pl.callbacks.ModelCheckpoint) for cb in callbacks),
    )
    kwargs.update(options)
    return pl.Trainer(callbacks=callbacks, **kwargs)
