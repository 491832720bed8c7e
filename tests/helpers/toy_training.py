"""Shared pieces of the real Trainer runs: a learnable toy task, TrainingArguments, a scheduled BERT."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from peft_layersched import LayerScheduleCallback

from helpers.scheduled_cases import BY_FAMILY


class ToyClassification(Dataset):
    """A learnable toy task: the label is whether token 7 appears in the sequence."""

    def __init__(self, n=16, seq=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 99, (n, seq), generator=generator)
        self.ids[: n // 2, 0] = 7
        self.labels = (self.ids == 7).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def scheduled_bert(schedule, unit="epoch", dropout=0.1, num_layers=12, base_fields=None, **config):
    """The Trainer tests' model: the case table's BERT as a sequence classifier, scheduled by ``schedule``.

    ``base_fields``: more BertConfig fields; ``config``: more ScheduledLoraConfig fields.
    """
    return BY_FAMILY["bert"].build(
        base=dict(num_layers=num_layers, **(base_fields or {})),
        layer_schedule=schedule,
        schedule_unit=unit,
        task_type="SEQ_CLS",
        lora_dropout=dropout,
        **config,
    )


def cpu_flag():
    # Gloo DDP on CPU: `use_cpu` since transformers 4.34, `no_cuda` before.
    fields = TrainingArguments.__dataclass_fields__
    return {"use_cpu": True} if "use_cpu" in fields else {"no_cuda": True}


def training_args(out, **overrides):
    kwargs = dict(
        output_dir=str(out),
        num_train_epochs=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def train(model, out, callbacks=None, dataset=None, resume=None, **args):
    """A Trainer run with the schedule callback (or the given callbacks); returns the trainer."""
    trainer = Trainer(
        model=model,
        args=training_args(out, **args),
        train_dataset=dataset if dataset is not None else ToyClassification(),
        callbacks=callbacks if callbacks is not None else [LayerScheduleCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer
