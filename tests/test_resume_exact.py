"""Multi-stage training and resume are exact: real Trainer runs of what a stage, a checkpoint and a resume
record of the schedule (``schedule_position``, ever-active layers, optimizer state, warm-up, tracker
scalars), and refusals of runs that would train nothing."""

from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback

from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig, _compat, export_lora

from helpers import tiny_models
from helpers.jit import SigtermAt, needs_jit
from helpers.snapshots import lora, same
from helpers.toy_training import ToyClassification, scheduled_bert, train, training_args

TOP = 11  # tiny_models.bert() has 12 layers; ToyClassification(16) with batch 4: 4 optimizer steps per epoch


def entries(trainer):
    return [e for e in trainer.state.log_history if "schedule_time" in e]


def saved_config(folder):
    with open(os.path.join(str(folder), "adapter_config.json")) as handle:
        return json.load(handle)


# ------------------------------------------------------------------ schedule_position and later stages

POSITION_CASES = [
    # (id, layer_schedule, unit, Trainer options, the position a stage ends at): the active set does not
    # change over the stage's last epochs/steps
    ("gradual-every-2-over-4-epochs", {"type": "gradual", "k": 1, "n": 1, "every": 2}, "epoch",
     {"num_train_epochs": 4}, 3),
    ("cyclic-every-4-over-10-steps", {"type": "cyclic", "block": 1, "every": 4}, "step", {"max_steps": 10}, 10),
]


@pytest.mark.parametrize("spec,unit,options,position", [c[1:] for c in POSITION_CASES],
                         ids=[c[0] for c in POSITION_CASES])
def test_position_is_where_the_stage_ended_and_continue_goes_on_from_there(tmp_path, spec, unit, options, position):
    model = scheduled_bert(spec, unit=unit, num_layers=4)
    train(model, tmp_path / "one", **options)
    assert model.peft_config["default"].schedule_position == position
    model.save_pretrained(str(tmp_path / "adapter"))
    assert saved_config(tmp_path / "adapter")["schedule_position"] == position
    second = train(model, tmp_path / "two", callbacks=[LayerScheduleCallback(schedule_start="continue")], **options)
    first = entries(second)[0]
    assert first["schedule_time"] == (position + 1 if unit == "epoch" else position)
    assert first["schedule_offset"] == first["schedule_time"] and first["step"] == 0


def test_restart_over_a_stage_without_switches_still_warns(tmp_path, caplog):
    model = scheduled_bert({0: [TOP]})
    train(model, tmp_path / "one", num_train_epochs=2)
    assert model.peft_config["default"].schedule_position == 1
    with caplog.at_level(logging.WARNING, logger="peft_layersched"):
        train(model, tmp_path / "two", num_train_epochs=1)
    assert any("had reached epoch 1" in r.getMessage() for r in caplog.records)


def test_one_callback_reused_for_a_later_stage_continues_from_that_stage(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [10], 2: [9], 3: [8]})
    callback = LayerScheduleCallback(schedule_start="continue")
    train(model, tmp_path / "one", callbacks=[callback], num_train_epochs=2)
    assert model.active_layers == [10]
    second = train(model, tmp_path / "two", callbacks=[callback], num_train_epochs=2)
    assert [(e["schedule_time"], e["active_layers"]) for e in entries(second)] == [(2, "9"), (3, "8")]
    assert model.active_layers == [8] and model.peft_config["default"].schedule_position == 3


def test_the_step_after_the_last_switches_nothing_in(tmp_path):
    # Layer 1 would join at step 10, the step after the last: it never trains, so it is not ever-active.
    model = scheduled_bert({0: [TOP], 10: [1, TOP]}, unit="step")
    train(model, tmp_path / "run", max_steps=10)
    assert model.ever_active_layers == [TOP]
    assert model.active_layers == [TOP]
    config = model.peft_config["default"]
    assert config.schedule_position == 10 and config.ever_active_layers == [TOP]
    model.save_pretrained(str(tmp_path / "adapter"))
    assert saved_config(tmp_path / "adapter")["ever_active_layers"] == [TOP]
    exported = export_lora(model, str(tmp_path / "export"))
    assert not any(".layer.1." in name for name in exported.target_modules)


# ----------------------------------------------------------------------------------- exact resume

REJOIN = {0: [TOP], 1: [1], 2: [TOP]}  # epoch unit: layer 11 rejoins at epoch 2 (step 8)


class LegacyResumeWeights(TrainerCallback):
    """transformers 4.30 resumes only from a full weights file: what LayerScheduleCallback writes, for a
    run without it."""

    def on_save(self, args, state, control, model=None, **kwargs):
        _compat.write_legacy_resume_weights(model, args, state)


@pytest.fixture(scope="module")
def trainer_resumes_mid_epoch_exactly(tmp_path_factory):
    """Whether this transformers resumes plain PEFT LoRA bitwise from a mid-epoch checkpoint (4.33 and 4.55
    do not: measured here with vanilla LoraConfig, no schedule, no callback)."""
    folder = tmp_path_factory.mktemp("vanilla-mid-epoch")

    def run(out, resume=None, save=False):
        torch.manual_seed(0)
        model = get_peft_model(tiny_models.bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                              task_type="SEQ_CLS", lora_dropout=0.1))
        train(model, out, callbacks=[LegacyResumeWeights()], resume=resume, num_train_epochs=3,
              **({"save_strategy": "steps", "save_steps": 5} if save else {}))
        return lora(model)

    straight = run(folder / "straight")
    run(folder / "first", save=True)
    return same(straight, run(folder / "resumed", resume=os.path.join(str(folder / "first"), "checkpoint-10")))


@pytest.mark.parametrize("policy", [{"reactivated_state": "reset"}, {"frozen_optimizer_state": "drop"}],
                         ids=["reset", "drop"])
def test_resume_mid_epoch_after_a_rejoin_is_bitwise(tmp_path, policy, trainer_resumes_mid_epoch_exactly):
    if not trainer_resumes_mid_epoch_exactly:
        pytest.skip("this transformers does not resume plain PEFT LoRA bitwise from a mid-epoch checkpoint either")

    def run(out, resume=None, save=False):
        model = scheduled_bert(REJOIN)
        trainer = train(model, out, callbacks=[LayerScheduleCallback(**policy)], resume=resume,
                        num_train_epochs=3, **({"save_strategy": "steps", "save_steps": 5} if save else {}))
        return model, trainer

    straight, _ = run(tmp_path / "straight")
    run(tmp_path / "first", save=True)
    checkpoint = os.path.join(str(tmp_path / "first"), "checkpoint-10")  # mid-epoch 2, after the rejoin
    resumed, trainer = run(tmp_path / "resumed", resume=checkpoint)
    assert same(lora(straight), lora(resumed))
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert int(inner.state[resumed.base_model.layer_parameters()[TOP][0]]["step"]) == 4  # epoch 2's steps


def test_resume_reads_the_one_state_entry_not_the_switch_log(tmp_path):
    # Resumed at epoch 2, where layer 11 rejoins: only the saved state says the optimizer's state was saved
    # before the rejoin, so that "reset" drops layer 11's old moments as the uninterrupted run did.
    def run(out, resume=None, save=False):
        model = scheduled_bert(REJOIN)
        train(model, out, callbacks=[LayerScheduleCallback(reactivated_state="reset")], resume=resume,
              num_train_epochs=3, **({"save_strategy": "steps", "save_steps": 8} if save else {}))
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "first", save=True)
    checkpoint = os.path.join(str(tmp_path / "first"), "checkpoint-8")  # the end of epoch 1
    path = os.path.join(checkpoint, "trainer_state.json")
    with open(path) as handle:
        saved = json.load(handle)
    states = [e["layer_schedule_state"] for e in saved["log_history"] if "layer_schedule_state" in e]
    assert len(states) == 1 and (states[0]["steps"], states[0]["time"]) == (8, 1)
    # The switch entries are there for people and trackers; a resume does not need them.
    saved["log_history"] = [e for e in saved["log_history"] if "schedule_time" not in e]
    with open(path, "w") as handle:
        json.dump(saved, handle)
    assert same(lora(straight), lora(run(tmp_path / "resumed", resume=checkpoint)))


class ChangeBatchProbe(TrainerCallback):
    """After each optimizer step: the Trainer's epoch of that step, and the layers that trained in it."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((int(math.ceil(state.epoch - 1e-9)) - 1, list(model.base_model.active_layers)))


def test_resume_with_another_batch_size_follows_the_trainers_epoch(tmp_path):
    schedule = {0: [TOP], 1: [10], 2: [9], 3: [8]}
    train(scheduled_bert(schedule), tmp_path / "first", num_train_epochs=4, save_strategy="steps", save_steps=6)
    model = scheduled_bert(schedule)
    probe = ChangeBatchProbe()
    train(model, tmp_path / "second", callbacks=[LayerScheduleCallback(), probe], num_train_epochs=4,
          per_device_train_batch_size=2, resume=os.path.join(str(tmp_path / "first"), "checkpoint-6"))
    assert probe.seen  # (transformers 4.x keeps the checkpoint's batch size, 5.x takes the new one)
    for epoch, active in probe.seen:
        assert active == schedule[epoch], (epoch, active, probe.seen)


# ---------------------------------------------------------------------------------- warm-up

class ToyStream(IterableDataset):
    """ToyClassification without ``__len__``: the Trainer cannot count its steps per epoch."""

    def __init__(self):
        self.data = ToyClassification()

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def _first_updates_of_joining_layer(out, warmup, dataset):
    model = scheduled_bert({0: [TOP], 1: [1, TOP]}, dropout=0.0)
    before = {}

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            before[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()
                                         if ".layer.1." in n and "lora_" in n}

    train(model, out, callbacks=[LayerScheduleCallback(new_layer_warmup_steps=warmup), Watch()], dataset=dataset,
          max_steps=8, optim="sgd", weight_decay=0.0, lr_scheduler_type="constant")
    return {n: before[5][n] - before[4][n] for n in before[5]}  # step 5: the first one layer 1 takes


@pytest.mark.parametrize("dataset", [ToyClassification, ToyStream], ids=["sized", "iterable"])
def test_warmup_in_epoch_units_counts_real_steps(tmp_path, dataset):
    plain = _first_updates_of_joining_layer(tmp_path / "plain", 0, dataset())
    warm = _first_updates_of_joining_layer(tmp_path / "warm", 4, dataset())
    moved = [n for n, delta in plain.items() if delta.abs().sum() > 0]
    assert moved
    for name in moved:  # step 1 of 4 of the warm-up: a quarter of the update
        torch.testing.assert_close(warm[name], 0.25 * plain[name], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------ tracker scalars

class Records(TrainerCallback):
    """Every training log record as the callbacks after LayerScheduleCallback see it."""

    def __init__(self):
        self.by_step = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.by_step[state.global_step] = dict(logs)


def test_each_record_describes_its_own_step(tmp_path):
    model = scheduled_bert({0: [TOP], 3: [1, TOP]}, unit="step")
    seen = Records()
    train(model, tmp_path, callbacks=[LayerScheduleCallback(), seen], max_steps=6, lr_scheduler_type="linear",
          learning_rate=1e-2)
    records = seen.by_step
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    for step, record in records.items():
        trained = [TOP] if step <= 3 else [1, TOP]  # step n runs schedule step n - 1
        assert record["layer_schedule/active_layers"] == len(trained), step
        assert record["active_layers"] == ",".join(str(layer) for layer in trained), step
        used = 1e-2 * (6 - (step - 1)) / 6.0  # linear decay: the LR step n used
        assert record["layer_schedule/lr/{}".format(TOP)] == pytest.approx(used, rel=1e-6), step
        assert record["layer_schedule/lr/1"] == (pytest.approx(used, rel=1e-6) if step > 3 else 0.0), step
    assert records[6]["layer_schedule/lr/{}".format(TOP)] > 0


# ------------------------------------------------------------------------------ nothing to train

def _headless(schedule, unit="epoch"):
    # No task_type: the classifier is not in modules_to_save, so only the scheduled LoRA layers train.
    config = ScheduledLoraConfig(r=4, target_modules=["query", "value"], layer_schedule=schedule, schedule_unit=unit,
                                 init_seed=0)
    return get_peft_model(tiny_models.bert(num_layers=4), config)


IDLE_CASES = [
    ("no-layer-before-the-first-milestone", {1: [3]}, "epoch", "epoch 0"),
    ("empty-later-phase", {0: [3], 1: []}, "epoch", "epoch 1"),
    ("gradual-k-0", {"type": "gradual", "k": 0, "n": 1, "every": 1}, "epoch", "epoch 0"),
    ("empty-step-phase", {0: [3], 5: []}, "step", "step 5"),
]


@pytest.mark.parametrize("schedule,unit,when", [c[1:] for c in IDLE_CASES], ids=[c[0] for c in IDLE_CASES])
def test_a_run_with_nothing_to_train_is_refused_before_the_first_step(tmp_path, schedule, unit, when):
    model = _headless(schedule, unit)
    before = lora(model)
    with pytest.raises(ValueError, match=r"activates no layer at {}.*modules_to_save".format(when)):
        train(model, tmp_path, num_train_epochs=2, remove_unused_columns=False)
    assert same(before, lora(model))  # refused before any step


def test_idle_times_are_fine_with_modules_to_save_or_outside_the_run(tmp_path):
    scheduled = scheduled_bert({1: [3]}, num_layers=4)  # SEQ_CLS: the classifier trains at epoch 0
    train(scheduled, tmp_path / "head", num_train_epochs=2)
    assert scheduled.active_layers == [3]
    short = _headless({0: [3], 5: []}, "step")
    train(short, tmp_path / "short", max_steps=5, remove_unused_columns=False)  # step 5 is never run
    assert short.peft_config["default"].schedule_position == 5


# ------------------------------------------------------------------------ just-in-time checkpoint

ROTATION = {0: [0], 2: [1], 4: [2], 6: [0, 3]}  # step unit, 4 layers: layer 0 rejoins at step 6


@needs_jit
@pytest.mark.parametrize("when", ["before-switch", "after-switch"])
@pytest.mark.slow  # three Trainer runs each
def test_just_in_time_checkpoint_carries_the_schedule(tmp_path, when):
    def run(out, resume=None, sigterm=None):
        model = scheduled_bert(ROTATION, unit="step", num_layers=4)
        holder = []
        callbacks = [LayerScheduleCallback(reactivated_state="reset", new_layer_warmup_steps=2)]
        if sigterm is not None:
            callbacks.append(SigtermAt(holder, sigterm, when))
        trainer = Trainer(model=model, args=training_args(out, max_steps=10, enable_jit_checkpoint=sigterm is not None),
                          train_dataset=ToyClassification(), callbacks=callbacks)
        holder.append(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        run(tmp_path / "first", sigterm=6)  # checkpoint at step 6, where layer 0 rejoins (reset)
    finally:
        signal.signal(signal.SIGTERM, previous)
    checkpoint = os.path.join(str(tmp_path / "first"), "checkpoint-6")
    assert os.path.isdir(checkpoint), os.listdir(str(tmp_path / "first"))
    assert saved_config(checkpoint)["schedule_position"] == 6
    resumed = run(tmp_path / "first", resume=checkpoint)
    assert same(lora(straight), lora(resumed))
