"""Real ``transformers.Trainer`` runs that prove each guarantee of ``LayerScheduleCallback``."""

from __future__ import annotations

import glob
import os
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback

from peft_layersched import LayerScheduleCallback

from helpers.snapshots import lora as lora_of
from helpers.snapshots import same
from helpers.toy_training import ToyClassification, scheduled_bert, train, training_args

TOP = 11  # tiny_models.bert() has 12 layers


class Probe(TrainerCallback):
    """Records, per optimizer step, the LoRA weights of the watched layers and the trainable set."""

    def __init__(self, layers):
        self.layers = layers
        self.at_step = {}
        self.windows = []
        self._window = []
        self.epochs_begun = 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epochs_begun += 1

    def _trainable(self, model):
        return frozenset(n for n, p in model.named_parameters() if p.requires_grad)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_step[state.global_step] = {layer: lora_of(model, layer) for layer in self.layers}

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._window.append(self._trainable(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Runs before LayerScheduleCallback (listed first), i.e. before any switch at this step.
        self._window.append(self._trainable(model))
        self.windows.append(self._window)
        self._window = []
        self.at_step[state.global_step] = {layer: lora_of(model, layer) for layer in self.layers}


def schedule_entries(trainer):
    return [e for e in trainer.state.log_history if "schedule_time" in e]


def test_newly_active_layer_trains_and_frozen_layer_stays_bitwise(tmp_path):
    # 16 samples / batch 4 = 4 steps per epoch. Layer 11 trains epochs 0-1 and is frozen in 2-3;
    # layer 1 joins at epoch 2: it is in the optimizer although it was not active when the Trainer built
    # it (the callback makes every preallocated LoRA parameter require grad at on_init_end).
    model = scheduled_bert({0: [TOP], 2: [1]})
    probe = Probe([1, TOP])
    trainer = train(model, tmp_path, callbacks=[probe, LayerScheduleCallback()])
    steps = probe.at_step
    assert not same(steps[0][TOP], steps[8][TOP]), "the first-phase layer never trained"
    assert same(steps[0][1], steps[8][1]), "a dormant layer moved before its phase"
    assert not same(steps[8][1], steps[16][1]), "the layer unfrozen at epoch 2 never trained"
    # Frozen from epoch 2 on with weight_decay=0.1 and AdamW momentum: bitwise still.
    for step in range(9, 17):
        assert same(steps[8][TOP], steps[step][TOP]), "frozen layer drifted at step {}".format(step)
    entries = schedule_entries(trainer)
    assert [(e["schedule_time"], e["active_layers"], e["step"]) for e in entries] == [
        (0, "11", 0),
        (2, "1", 8),
    ]
    # one layer each (11, then 1: the same modules and sizes), plus the classifier head: the same count
    assert entries[0]["trainable_params"] == entries[1]["trainable_params"]


def test_every_group_follows_the_lr_schedule(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [1, TOP]})
    trainer = train(model, tmp_path, callbacks=[LayerScheduleCallback()], num_train_epochs=2)
    optimizer = trainer.optimizer
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for params in model.base_model.layer_parameters().values():
        assert all(id(p) in held for p in params)
    last = trainer.lr_scheduler.get_last_lr()
    assert len(last) == len(optimizer.param_groups)
    assert [g["lr"] for g in optimizer.param_groups] == last
    assert len(set(last)) == 1  # linear decay reached the same point for every group


def test_callback_added_after_activate_layers_still_trains_every_layer(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [1]})
    model.activate_layers(0)  # freezes layer 1 before the Trainer builds its optimizer
    probe = Probe([1])
    trainer = Trainer(model=model, args=training_args(tmp_path, num_train_epochs=2), train_dataset=ToyClassification())
    trainer.add_callback(probe)
    trainer.add_callback(LayerScheduleCallback())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert any("lacked the LoRA parameters" in str(w.message) for w in caught)
    assert not same(probe.at_step[4][1], probe.at_step[8][1]), "layer 1 never trained"


def test_user_optimizer_without_later_layers_is_refused(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [1]})
    model.activate_layers(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, num_train_epochs=2),
        train_dataset=ToyClassification(),
        optimizers=(optimizer, scheduler),
        callbacks=[LayerScheduleCallback()],
    )
    with pytest.raises(ValueError, match=r"does not hold the LoRA parameters of layer\(s\) \[1\]"):
        trainer.train()


def test_step_schedule_switches_at_scheduled_optimizer_steps(tmp_path):
    model = scheduled_bert({0: [TOP], 3: [1, TOP], 6: [1]}, unit="step")
    trainer = train(model, tmp_path, callbacks=[LayerScheduleCallback()], num_train_epochs=2)
    assert [(e["step"], e["active_layers"]) for e in schedule_entries(trainer)] == [
        (0, "11"),
        (3, "1,11"),
        (6, "1"),
    ]


@pytest.mark.parametrize("unit,schedule", [("epoch", {0: [TOP], 1: [1, TOP], 2: [1]}), ("step", {0: [TOP], 2: [1]})])
def test_no_switch_inside_a_gradient_accumulation_window(tmp_path, unit, schedule):
    # 5 batches per epoch with accumulation 2: on transformers <= 4.46 windows span epoch boundaries.
    model = scheduled_bert(schedule, unit=unit)
    probe = Probe([])
    trainer = train(
        model,
        tmp_path,
        callbacks=[probe, LayerScheduleCallback()],
        dataset=ToyClassification(n=20),
        num_train_epochs=3,
        gradient_accumulation_steps=2,
    )
    assert probe.windows
    for window in probe.windows:
        assert len(set(window)) == 1, "the trainable set changed inside an accumulation window"
    # Trainers up to 4.51 count floor(5 / 2) = 2 steps per epoch but run 3: max_steps can end the run
    # before the last epoch begins. Every phase that was reached must have switched.
    reached = [start for start in schedule if unit == "step" or start < probe.epochs_begun]
    assert [e["schedule_time"] for e in schedule_entries(trainer)] == reached


def test_new_layer_lr_scale_zero_means_the_new_layer_never_moves(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [1, TOP]})
    probe = Probe([1, TOP])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the probe runs after the callback: it sees the scaled update
        train(model, tmp_path, callbacks=[LayerScheduleCallback(new_layer_lr_scale=0.0), probe], num_train_epochs=2)
    assert same(probe.at_step[4][1], probe.at_step[8][1])
    assert not same(probe.at_step[4][TOP], probe.at_step[8][TOP])
    assert any("did not change at all" in str(w.message) for w in caught), "no-update detector stayed silent"


def _first_update_of_new_layer(tmp_path, scale, warmup):
    model = scheduled_bert({0: [TOP], 1: [1, TOP]}, dropout=0.0)
    probe = Probe([1])
    train(
        model,
        tmp_path,
        callbacks=[LayerScheduleCallback(new_layer_lr_scale=scale, new_layer_warmup_steps=warmup), probe],
        num_train_epochs=2,
        optim="sgd",
        weight_decay=0.0,
        lr_scheduler_type="constant",
    )
    return [{k: probe.at_step[s][1][k] - probe.at_step[s - 1][1][k] for k in probe.at_step[s][1]} for s in (5, 6)]


def test_new_layer_lr_scale_and_warmup_scale_the_update(tmp_path):
    plain = _first_update_of_new_layer(tmp_path / "a", 1.0, 0)
    half = _first_update_of_new_layer(tmp_path / "b", 0.5, 0)
    warm = _first_update_of_new_layer(tmp_path / "c", 1.0, 4)
    compared = 0
    for name, delta in plain[0].items():
        if delta.abs().sum() == 0:
            assert "lora_A" in name, "{} did not move in the new layer's first step".format(name)
            continue  # lora_A gets no gradient while lora_B is still zero
        torch.testing.assert_close(half[0][name], 0.5 * delta, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(warm[0][name], 0.25 * delta, rtol=1e-4, atol=1e-7)  # step 1 of 4
        compared += 1
    # every lora_B of layer 1 (query and value) moved and was compared
    assert compared == sum(1 for name in plain[0] if "lora_B" in name) == 2


def test_reactivated_layer_state_reset(tmp_path):
    model = scheduled_bert({0: [TOP], 1: [1], 2: [TOP]})
    trainer = train(model, tmp_path, callbacks=[LayerScheduleCallback(reactivated_state="reset")], num_train_epochs=3)
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    top_param = model.base_model.layer_parameters()[TOP][0]
    assert int(inner.state[top_param]["step"]) == 4  # epoch 2 only, state from epochs 0 was dropped
    layer1 = model.base_model.layer_parameters()[1][0]
    assert int(inner.state[layer1]["step"]) == 4


def _run(tmp_path, epochs, resume=None, save=True):
    model = scheduled_bert({0: [TOP], 2: [1, TOP]})
    trainer = train(model, tmp_path, resume=resume, num_train_epochs=epochs, save_strategy="epoch" if save else "no")
    return model, trainer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The 4-epoch run of ``_run`` with a checkpoint per epoch, done once: resumed runs read its checkpoints
    and write to folders of their own."""
    folder = tmp_path_factory.mktemp("checkpointed")
    _run(folder, 4)
    return str(folder)


def test_resume_at_epoch_boundary_is_bitwise_identical(tmp_path, checkpoints):
    straight, _ = _run(tmp_path / "straight", 4, save=False)
    checkpoint = os.path.join(checkpoints, "checkpoint-8")  # end of epoch 1
    assert os.path.isdir(checkpoint), sorted(glob.glob(os.path.join(checkpoints, "*")))
    resumed, trainer = _run(tmp_path / "resumed", 4, resume=checkpoint)
    entries = schedule_entries(trainer)
    assert (entries[-1]["schedule_time"], entries[-1]["active_layers"], entries[-1]["step"]) == (2, "1,11", 8)
    for layer in (1, TOP):
        assert same(lora_of(straight, layer), lora_of(resumed, layer))


def test_resume_mid_phase_restores_the_active_set(tmp_path, checkpoints):
    checkpoint = os.path.join(checkpoints, "checkpoint-12")  # end of epoch 2, inside phase {1, 11}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trainer = _run(tmp_path, 4, resume=checkpoint)
    # layer 1 trained after step 0: its weights come in before the schedule is at step 12, not a mismatch
    assert not [w for w in caught if "carry trained LoRA weights" in str(w.message)]
    first = [e for e in schedule_entries(trainer) if e["step"] == 12][0]
    assert first["active_layers"] == "1,11"
    assert trainer.model.active_layers == [1, TOP]


@pytest.mark.parametrize("orig_params", [None, "false"])
def test_fsdp1_without_use_orig_params_is_refused(tmp_path, monkeypatch, orig_params):
    # accelerate launch --use_fsdp sets these variables for every rank.
    model = scheduled_bert({0: [TOP]})
    args = training_args(tmp_path)  # built before the variables: transformers reads them at construction
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    if orig_params is not None:
        monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", orig_params)
    with pytest.raises(ValueError, match=r"FSDP1 needs use_orig_params=True.*FSDP2"):
        LayerScheduleCallback().on_init_end(args, None, None, model=model)
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    LayerScheduleCallback().on_init_end(args, None, None, model=model)
    assert model.base_model.freezing == "requires_grad"


def test_deepspeed_freezes_through_the_optimizer(tmp_path, monkeypatch):
    # ZeRO fixes the trainable set at initialize: requires_grad never changes, the per-layer LR freezes.
    model = scheduled_bert({0: [TOP], 2: [1]})
    args = training_args(tmp_path)  # built before the variable: transformers would set up DeepSpeed itself
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="reactivated_state='reset' is not available under DeepSpeed"):
        LayerScheduleCallback(reactivated_state="reset").on_init_end(args, None, None, model=model)
    LayerScheduleCallback().on_init_end(args, None, None, model=model)
    assert model.base_model.freezing == "optimizer"
    model.activate_layers(2)
    assert all(p.requires_grad for ps in model.base_model.layer_parameters().values() for p in ps)
    model.base_model.set_freezing("requires_grad")
    assert not any(p.requires_grad for p in model.base_model.layer_parameters()[TOP])
