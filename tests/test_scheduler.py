"""``LayerScheduler``, the core every training loop drives: plain-loop runs (no Trainer), its engines, exact LR
factors for several optimizers and LR schedulers, resume from ``state_dict``, the Trainer mixin, and a package
whose modules import one another without a circle."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings

import pytest
import torch
from transformers import SchedulerType, Trainer, TrainerCallback, TrainingArguments

from peft_layersched import LayerScheduleCallback, LayerScheduler, LayerScheduleTrainerMixin
from peft_layersched.training import ScheduleOptions
from peft_layersched.training import options as options_module
from peft_layersched.training.engines import LAYER_KEY, LrZeroEngine, RequiresGradEngine

from helpers.snapshots import lora, same
from helpers.toy_training import ToyClassification, scheduled_bert, training_args

ROTATION = {0: [0], 3: [1], 6: [0, 2], 9: [3]}  # step unit, 4 layers: layer 0 freezes at 3 and rejoins at 6


def batch(step, n=4):
    data = ToyClassification(n=16, seed=step)
    return {"input_ids": data.ids[:n], "labels": data.labels[:n]}


def model_(schedule=ROTATION, unit="step", dropout=0.0):
    torch.manual_seed(0)
    return scheduled_bert(schedule, unit=unit, num_layers=4, dropout=dropout)


def plain_loop(model, optimizer, lr_scheduler, sched, steps, start=0, watch=None):
    for step in range(start, steps):
        model.train()
        torch.manual_seed(step)  # the base model's dropout: the same draws whether resumed or not
        model(**batch(step)).loss.backward()
        optimizer.step()
        lr_scheduler.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if watch is not None:
            watch.append((sched.steps, lora(model), sched.metrics()))
    return model


def built(policy=None, optimizer_cls=torch.optim.AdamW, **options):
    model = model_()
    optimizer = optimizer_cls(LayerScheduler.param_groups(model), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 20.0)
    sched = LayerScheduler(model, optimizer, total_steps=12, **dict(policy or {}, **options))
    return model, optimizer, lr_scheduler, sched


# ------------------------------------------------------------------------------------ plain loop

def test_plain_loop_switches_freezes_and_trains_joining_layers():
    model, optimizer, lr_scheduler, sched = built()
    seen = []
    plain_loop(model, optimizer, lr_scheduler, sched, 12, watch=seen)
    by_step = {step: weights for step, weights, _ in seen}
    layer0 = [n for n in by_step[3] if ".layer.0." in n]
    assert all(torch.equal(by_step[3][n], by_step[6][n]) for n in layer0), "layer 0 moved while frozen"
    assert not all(torch.equal(by_step[6][n], by_step[9][n]) for n in layer0), "layer 0 did not train on rejoining"
    assert model.ever_active_layers == [0, 1, 2, 3] and model.peft_config["default"].schedule_position == 12
    metrics = {step: m for step, _, m in seen}
    assert metrics[3]["layer_schedule/active/0"] == 1.0 and metrics[4]["layer_schedule/active/0"] == 0.0
    assert metrics[4]["layer_schedule/lr/0"] == 0.0 and metrics[4]["layer_schedule/lr/1"] > 0


@pytest.mark.parametrize("policy", [{}, {"frozen_optimizer_state": "drop"}, {"reactivated_state": "reset"},
                                    {"new_layer_warmup_steps": 3, "new_layer_lr_scale": 0.5}],
                         ids=["keep", "drop", "reset", "warmup"])
def test_plain_loop_resume_from_state_dict_is_bitwise(tmp_path, policy):
    model, optimizer, lr_scheduler, sched = built(policy)
    straight = lora(plain_loop(model, optimizer, lr_scheduler, sched, 12))

    model, optimizer, lr_scheduler, sched = built(policy)
    plain_loop(model, optimizer, lr_scheduler, sched, 7)  # mid-phase, after layer 0 rejoined at 6
    path = os.path.join(str(tmp_path), "state.pt")
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "lora_" in n}
    torch.save({"weights": trained, "optimizer": optimizer.state_dict(), "lr": lr_scheduler.state_dict(),
                "sched": sched.state_dict()}, path)
    del model, optimizer, lr_scheduler, sched

    # Build everything again; the scheduler resumes (layers as at step 7) before the weights come in, so
    # the load sees the layers that trained as ever-active.
    saved = torch.load(path)
    model = model_()
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 20.0)
    optimizer.load_state_dict(saved["optimizer"])  # after the LR scheduler's constructor, which sets the LRs
    lr_scheduler.load_state_dict(saved["lr"])
    sched = LayerScheduler(model, optimizer, total_steps=12, state_dict=saved["sched"], **policy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "carry trained LoRA weights" mismatch
        model.load_state_dict(saved["weights"], strict=False)
    assert sched.steps == 7 and model.active_layers == [0, 2]
    assert same(straight, lora(plain_loop(model, optimizer, lr_scheduler, sched, 12, start=7)))


def test_a_state_saved_with_another_unit_is_refused():
    model, optimizer, lr_scheduler, sched = built()
    saved = dict(sched.state_dict(), unit="epoch")
    with pytest.raises(ValueError, match=r"counts epochs, but this scheduler's unit is 'step'"):
        LayerScheduler(model, optimizer, state_dict=saved)
    with pytest.raises(ValueError, match=r"counts epochs, but this scheduler's unit is 'step'"):
        sched.load_state_dict(saved)


# ---------------------------------------------------------------------------------- LR factors

def _first_update_of_layer_1(optimizer_cls, scale, **kwargs):
    model = model_({0: [0], 2: [0, 1]})
    optimizer = optimizer_cls(LayerScheduler.param_groups(model), **kwargs)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sched = LayerScheduler(model, optimizer, new_layer_lr_scale=scale)
    seen = []
    plain_loop(model, optimizer, lr_scheduler, sched, 3, watch=seen)
    before, after = seen[1][1], seen[2][1]
    return {n: after[n] - before[n] for n in after if ".layer.1." in n and "lora_B" in n}


OPTIMIZERS = [("sgd", torch.optim.SGD, {"lr": 0.1}), ("adam", torch.optim.Adam, {"lr": 1e-2}),
              ("adamw", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1})]


@pytest.mark.parametrize("optimizer_cls,kwargs", [o[1:] for o in OPTIMIZERS], ids=[o[0] for o in OPTIMIZERS])
def test_new_layer_lr_scale_is_an_exact_lr_multiplier(optimizer_cls, kwargs):
    plain = _first_update_of_layer_1(optimizer_cls, 1.0, **kwargs)
    half = _first_update_of_layer_1(optimizer_cls, 0.5, **kwargs)
    assert plain and all(delta.abs().sum() > 0 for delta in plain.values())
    for name, delta in plain.items():
        torch.testing.assert_close(half[name], 0.5 * delta, rtol=1e-5, atol=1e-8)


def test_a_chainable_lr_scheduler_never_compounds_the_factors():
    # ExponentialLR multiplies the group's own LR at each step: a frozen layer's LR 0 must not stick.
    model = model_({0: [0], 2: [1], 4: [0, 1]})
    optimizer = torch.optim.SGD(LayerScheduler.param_groups(model), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    sched = LayerScheduler(model, optimizer, new_layer_lr_scale=0.5)
    seen = []
    plain_loop(model, optimizer, lr_scheduler, sched, 5, watch=seen)
    metrics = {step: m for step, _, m in seen}
    for step in (4, 5):  # both layers train from step 5 on: the LR step 5 uses, 0.1 x 0.5^4
        assert metrics[step]["layer_schedule/lr/0"] == pytest.approx(0.1 * 0.5 ** (step - 1), rel=1e-9) or step == 4
    assert metrics[5]["layer_schedule/lr/0"] == pytest.approx(0.1 * 0.5 ** 4, rel=1e-9)
    assert metrics[5]["layer_schedule/lr/1"] == pytest.approx(0.5 * 0.1 * 0.5 ** 4, rel=1e-9)
    assert lr_scheduler.get_last_lr() == pytest.approx([0.1 * 0.5 ** 5] * len(optimizer.param_groups))


# ----------------------------------------------------------------------------------- engines

def test_lr_zero_engine_freezes_through_the_lr_alone():
    # requires_grad stays True everywhere; the frozen layer's group at LR 0 keeps it bitwise still (AdamW
    # with weight decay and momentum from its active phase).
    model = model_({0: [0], 3: [1]})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2, weight_decay=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    sched = LayerScheduler(model, optimizer, engine="lr-zero")
    assert model.base_model.freezing == "optimizer"
    seen = []
    plain_loop(model, optimizer, lr_scheduler, sched, 6, watch=seen)
    assert all(p.requires_grad for ps in model.base_model.layer_parameters().values() for p in ps)
    at = {step: weights for step, weights, _ in seen}
    layer0 = [n for n in at[3] if ".layer.0." in n]
    assert all(torch.equal(at[3][n], at[6][n]) for n in layer0)
    assert not all(torch.equal(at[3][n], at[6][n]) for n in at[3] if ".layer.1." in n)
    lrs = {g[LAYER_KEY]: g["lr"] for g in optimizer.param_groups if LAYER_KEY in g}
    assert lrs == {0: 0.0, 1: pytest.approx(1e-2)}


ENGINE_REFUSALS = [
    (LrZeroEngine(), {"frozen_optimizer_state": "drop"}, r"not available under DeepSpeed.*offload_optimizer"),
    (LrZeroEngine(zero3=True), {"reactivated_state": "reset"}, r"reactivated_state='reset' is not available"),
    (RequiresGradEngine(sharded_state=True), {"frozen_optimizer_state": "offload"}, r"not supported under FSDP"),
]


@pytest.mark.parametrize("engine,options,message", ENGINE_REFUSALS, ids=["zero-drop", "zero3-reset", "fsdp-offload"])
def test_engines_refuse_what_cannot_work_under_them(engine, options, message):
    model = model_()
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=message):
        LayerScheduler(model, optimizer, engine=engine, **options)
    assert not LrZeroEngine(zero3=True).whole_parameters and RequiresGradEngine().whole_parameters
    with pytest.raises(ValueError, match=r"engine='zero' is not supported.*'requires_grad'.*'lr-zero'"):
        LayerScheduler(model, optimizer, engine="zero")


def test_the_tuners_name_of_the_lr_zero_freezing_mode_picks_the_same_engine():
    model = model_({0: [0], 3: [1]})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    sched = LayerScheduler(model, optimizer, engine="optimizer")
    assert isinstance(sched.engine, LrZeroEngine) and model.base_model.freezing == "optimizer"


# ----------------------------------------------------------------------------------- options

def test_options_are_declared_once_keyword_only_and_checked_in_one_place():
    fields = dataclasses.fields(ScheduleOptions)
    assert [f.name for f in fields] == list(options_module.NAMES) and len(fields) == 8
    assert all(f.metadata["help"].endswith(".") for f in fields)
    with pytest.raises(TypeError, match="keyword arguments only"):
        ScheduleOptions(0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ScheduleOptions().new_layer_lr_scale = 2.0
    assert ScheduleOptions(frozen_optimizer_state="drop").reactivated_state == "reset"
    assert ScheduleOptions(new_layer_lr_scale=1).new_layer_lr_scale == 1.0
    with pytest.raises(ValueError, match="frozen_optimizer_state='offload'"):
        ScheduleOptions(frozen_optimizer_state="drop", reactivated_state="keep")
    with pytest.raises(TypeError, match=r"LayerScheduleCallback\(\) got unexpected keyword argument\(s\) new_layer_lr"):
        LayerScheduleCallback(new_layer_lr=0.5)
    # Every driver takes them by keyword, with the dataclass's defaults.
    for driver in (LayerScheduler, LayerScheduleCallback):
        params = inspect.signature(driver).parameters
        assert {f.name: f.default for f in fields} == {f.name: params[f.name].default for f in fields}
        assert all(params[f.name].kind is inspect.Parameter.KEYWORD_ONLY for f in fields)
    callback = LayerScheduleCallback(new_layer_warmup_steps=3, frozen_optimizer_state="offload")
    assert callback.options() == dict(ScheduleOptions().as_dict(), new_layer_warmup_steps=3,
                                      frozen_optimizer_state="offload")


def test_the_docs_option_table_is_the_options_dataclass():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "trainer.md")
    text = open(path).read().split("## Options", 1)[1].split("\n\n|", 1)[1]
    table = ("|" + text).split("\n\n", 1)[0]  # the first table of the section
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    documented = {name.strip().strip("`"): default.strip() for name, default in rows}
    fields = {f.name: f.default for f in dataclasses.fields(ScheduleOptions)}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        if default is not None:  # (None: the table says what it means, e.g. "active adapter")
            shown = json.dumps(default) if isinstance(default, str) else repr(default)
            assert documented[name].startswith("`{}`".format(shown)), (name, documented[name])


def test_an_optimizer_without_layer_groups_is_refused_when_a_factor_needs_them():
    model = model_()
    flat = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    LayerScheduler(model, flat)  # no factor to set: frozen layers are frozen through requires_grad
    model = model_()
    flat = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match=r"no param group of their own for layer\(s\) \[0, 1, 2, 3\].*param_groups"):
        LayerScheduler(model, flat, new_layer_warmup_steps=2)
    model = model_()
    flat = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match=r"no param group of their own.*lr-zero"):
        LayerScheduler(model, flat, engine="lr-zero")
    model = model_()
    model.activate_layers(0)
    partial = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(ValueError, match=r"does not hold the LoRA parameters of layer\(s\) \[1, 2, 3\]"):
        LayerScheduler(model, partial)


def test_param_groups_keep_each_groups_options_and_do_not_touch_them():
    model = model_()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    given = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    groups = LayerScheduler.param_groups(model, given)
    assert given[0]["params"] is decay and len(given) == 2  # not written to
    layers = sorted({g[LAYER_KEY] for g in groups if LAYER_KEY in g})
    assert layers == [0, 1, 2, 3]
    assert all(g["weight_decay"] == 0.1 for g in groups if LAYER_KEY in g)  # LoRA weights have no bias
    assert sum(len(g["params"]) for g in groups) == len(decay) + len(no_decay)


# ------------------------------------------------------------------------------ Trainer mixin

class ScheduledTrainer(LayerScheduleTrainerMixin, Trainer):
    pass


def test_the_trainer_mixin_splits_groups_and_reports_numbers_without_the_class_patch(tmp_path):
    model = scheduled_bert({0: [11], 2: [10, 11]})
    trainer = ScheduledTrainer(model=model, args=training_args(tmp_path, num_train_epochs=3),
                               train_dataset=ToyClassification(),
                               callbacks=[LayerScheduleCallback(new_layer_lr_scale=0.5)])
    trainer.train()
    layers = sorted(g[LAYER_KEY] for g in trainer.optimizer.param_groups if LAYER_KEY in g)
    assert layers == [10, 11]
    records = [r for r in trainer.state.log_history if "layer_schedule/active_layers" in r]
    assert records and records[-1]["layer_schedule/lr/10"] == pytest.approx(0.5 * records[-1]["layer_schedule/lr/11"])


class GroupLRs(TrainerCallback):
    """After each optimizer step (and LayerScheduleCallback's): each layer group's LR for the next step."""

    def __init__(self):
        self.at = {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.at[state.global_step] = {g[LAYER_KEY]: g["lr"] for g in optimizer.param_groups if LAYER_KEY in g}


@pytest.mark.skipif("reduce_lr_on_plateau" not in {t.value for t in SchedulerType}
                    or "lr_scheduler_kwargs" not in TrainingArguments.__dataclass_fields__,
                    reason="this transformers has no reduce_lr_on_plateau schedule with lr_scheduler_kwargs")
def test_reduce_lr_on_plateau_in_the_trainer_reduces_frozen_layers_too(tmp_path):
    # A constant metric: the plateau scheduler halves the LR after every evaluation but the first. Layer 11 is
    # frozen (factor 0) in epoch 1; when it rejoins it must run at the reduced LR, like layer 1.
    fields = TrainingArguments.__dataclass_fields__
    strategy = {"eval_strategy" if "eval_strategy" in fields else "evaluation_strategy": "epoch"}
    model = scheduled_bert({0: [11], 1: [1], 2: [1, 11]})
    probe = GroupLRs()
    args = training_args(tmp_path, num_train_epochs=3, lr_scheduler_type="reduce_lr_on_plateau",
                         lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, metric_for_best_model="score",
                         greater_is_better=False, **strategy)
    Trainer(model=model, args=args, train_dataset=ToyClassification(), eval_dataset=ToyClassification(n=4),
            compute_metrics=lambda _: {"score": 1.0}, callbacks=[LayerScheduleCallback(), probe]).train()
    assert probe.at[9] == {1: pytest.approx(5e-3), 11: pytest.approx(5e-3)}, probe.at
    assert probe.at[5] == {1: pytest.approx(1e-2), 11: 0.0}, probe.at
