"""How a run ends: nothing switches in after its last step, however it stops (``max_steps``, a callback's
``should_training_stop``, ``EarlyStoppingCallback``), and ``load_best_model_at_end`` brings back a schedule
state that describes the best checkpoint's weights (its decision log; only layers that trained before it).
Real ``transformers.Trainer`` runs and plain loops on tiny models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from peft_layersched import LayerScheduleCallback, LayerScheduler, export_lora

from helpers.snapshots import lora
from helpers.toy_training import ToyClassification, scheduled_bert, training_args

LAYERS = 4

# transformers < 4.41 calls it evaluation_strategy
EVAL_STRATEGY = "eval_strategy" if "eval_strategy" in TrainingArguments.__dataclass_fields__ else "evaluation_strategy"
cpu_grad_scaler = pytest.mark.skipif(not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"),
                                     reason="a CPU GradScaler (torch.amp.GradScaler) needs torch >= 2.3")


def bert(schedule, unit="step"):
    return scheduled_bert(schedule, unit=unit, dropout=0.0, num_layers=LAYERS)


def trained_layers(model):
    """Layers whose ``lora_B`` moved away from its zero init: the layers that really trained."""
    out = set()
    for name, param in model.named_parameters():
        if "lora_B" in name and param.detach().abs().sum() > 0:
            out.add(int(name.split(".layer.")[1].split(".")[0]))
    return sorted(out)


def exported_layers(model, folder):
    config = export_lora(model, str(folder))
    return sorted({int(name.split(".layer.")[1].split(".")[0]) for name in config.target_modules})


def saved_config(folder):
    with open(os.path.join(str(folder), "adapter_config.json")) as handle:
        return json.load(handle)


class StopAt(TrainerCallback):
    """Ends the run after optimizer step ``step``, as any callback may (``control.should_training_stop``)."""

    def __init__(self, step, event="on_step_end"):
        self.step = step
        setattr(self, event, self._stop)

    def _stop(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# ----------------------------------------------------------------------- point 4: the run's last step


@pytest.mark.parametrize("first", [True, False], ids=["stopper-first", "stopper-last"])
@pytest.mark.parametrize("event", ["on_step_end", "on_log"])
def test_a_callback_stopping_the_run_at_a_switch_step_ends_like_max_steps(tmp_path, first, event):
    # Layer 1 is scheduled to join at step 3; the run stops after step 3, so it never trains.
    schedule = {0: [3], 3: [1, 3]}
    ref = bert(schedule)
    Trainer(model=ref, args=training_args(tmp_path / "ref", max_steps=3, lr_scheduler_type="constant"),
            train_dataset=ToyClassification(), callbacks=[LayerScheduleCallback()]).train()
    model = bert(schedule)
    callbacks = [StopAt(3, event), LayerScheduleCallback()]
    args = training_args(tmp_path / "stopped", max_steps=8, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(),
                      callbacks=callbacks if first else callbacks[::-1])
    trainer.train()
    assert trainer.state.global_step == 3
    assert trained_layers(model) == [3]
    assert model.ever_active_layers == [3], "a layer that never trained is listed as ever-active"
    assert model.active_layers == [3]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".layer.1." in n and "lora_" in n)
    assert exported_layers(model, tmp_path / "export") == [3]
    # The same state as the run that was told its length up front.
    model.save_pretrained(str(tmp_path / "a"))
    ref.save_pretrained(str(tmp_path / "b"))
    for key in ("ever_active_layers", "schedule_position"):
        assert saved_config(tmp_path / "a")[key] == saved_config(tmp_path / "b")[key], key
    a, b = lora(model), lora(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_lists_only_layers_that_trained(tmp_path):
    # One switch every second step (checkpoints every step): wherever early stopping ends the run and
    # whichever checkpoint is the best, the final model lists exactly the layers whose weights trained.
    schedule = {0: [3], 2: [2, 3], 4: [1, 2, 3], 6: [0, 1, 2, 3]}
    model = bert(schedule)
    scores = [0.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]  # the best: step 2, right after layer 2 joined
    calls = []

    def metric(_):
        calls.append(1)
        return {"score": scores[len(calls) - 1]}

    args = training_args(tmp_path / "run", max_steps=8, **{EVAL_STRATEGY: "steps"}, eval_steps=1, save_strategy="steps",
                         save_steps=1, load_best_model_at_end=True, metric_for_best_model="score",
                         greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(), eval_dataset=ToyClassification(n=4),
                      compute_metrics=metric,
                      callbacks=[LayerScheduleCallback(), EarlyStoppingCallback(early_stopping_patience=2)])
    trainer.train()
    assert trainer.state.global_step == 4, "early stopping did not end the run where expected"
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert trained_layers(model) == [3]
    assert model.ever_active_layers == [3], "a layer that joined at the best checkpoint's step never trained"
    assert model.active_layers == [3]
    assert model.peft_config["default"].schedule_position == 2
    assert exported_layers(model, tmp_path / "export") == [3]


def test_plain_loop_that_breaks_early_and_calls_finish_keeps_the_last_trained_set(tmp_path):
    torch.manual_seed(0)
    model = bert({0: [3], 2: [2, 3]})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    sched = LayerScheduler(model, optimizer)  # no total_steps: the loop decides when to stop
    data = ToyClassification()
    for step in range(2):
        batch = {k: torch.stack([data[i][k] for i in range(4 * step, 4 * step + 4)]) for k in ("input_ids", "labels")}
        model(**batch).loss.backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
    assert model.active_layers == [2, 3]  # switched after step 2, ready for a step 3
    sched.finish()  # the loop ended there: step 3 never came
    assert model.ever_active_layers == [3] == trained_layers(model)
    assert model.active_layers == [3]
    assert model.peft_config["default"].schedule_position == 2
    assert exported_layers(model, tmp_path / "export") == [3]


# ------------------------------------------------------------- point 5: load_best_model_at_end


TOP_K = {"type": "adaptive", "k": 2, "every": 3, "policy": "top", "explore": 0}


def best_at(step):
    """compute_metrics whose best evaluation is the one after optimizer step ``step`` (one per step)."""
    calls = []

    def metric(_):
        calls.append(1)
        return {"score": -abs(len(calls) - step)}

    return metric


def test_best_checkpoint_brings_back_its_decision_log_and_signal_state(tmp_path):
    model = scheduled_bert(TOP_K, unit="step", num_layers=LAYERS, dropout=0.0)
    args = training_args(tmp_path / "run", max_steps=12, **{EVAL_STRATEGY: "steps"}, eval_steps=1,
                         save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                         metric_for_best_model="score", greater_is_better=True, logging_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(), eval_dataset=ToyClassification(n=4),
                      compute_metrics=best_at(4), callbacks=[LayerScheduleCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    best = saved_config(os.path.join(trainer.state.best_model_checkpoint))["layer_schedule"]
    last = saved_config(tmp_path / "run" / "checkpoint-12")["layer_schedule"]
    assert [d["t"] for d in best["decisions"]] == [0, 3]
    assert [d["t"] for d in last["decisions"]] == [0, 3, 6, 9]
    # What the final model holds (and saves) is the best checkpoint's schedule, not the discarded steps'.
    config = model.peft_config["default"]
    assert config.layer_schedule["decisions"] == best["decisions"]
    assert config.layer_schedule["state"] == best["state"]
    assert config.schedule_position == 4
    assert model.active_layers == sorted(best["decisions"][-1]["layers"])
    entry = [e for e in trainer.state.log_history if "layer_schedule_adaptive" in e]
    assert len(entry) == 1 and entry[0]["layer_schedule_adaptive"]["decisions"] == best["decisions"]
    model.save_pretrained(str(tmp_path / "adapter"))
    assert saved_config(tmp_path / "adapter")["layer_schedule"] == config.layer_schedule

    # A second stage from the saved adapter decides at steps 6 and 9 from its own scores.
    from peft import PeftModel

    from helpers import tiny_models

    loaded = PeftModel.from_pretrained(tiny_models.bert(num_layers=LAYERS), str(tmp_path / "adapter"),
                                       is_trainable=True)
    second = Trainer(model=loaded, args=training_args(tmp_path / "two", max_steps=6, logging_steps=100),
                     train_dataset=ToyClassification(seed=1),
                     callbacks=[LayerScheduleCallback(schedule_start="continue")])
    second.train()
    decisions = loaded.peft_config["default"].layer_schedule["decisions"]
    assert [d["t"] for d in decisions] == [0, 3, 6, 9]
    assert decisions[:2] == best["decisions"]
    assert decisions[2]["scores"] != last["decisions"][2]["scores"], "the discarded run's decision was replayed"


def test_best_checkpoint_saved_right_after_a_switch_lists_only_trained_layers(tmp_path):
    model = bert({0: [3], 2: [2, 3], 3: [1, 2, 3]})
    args = training_args(tmp_path / "run", max_steps=4, **{EVAL_STRATEGY: "steps"}, eval_steps=1, save_strategy="steps",
                         save_steps=1, load_best_model_at_end=True, metric_for_best_model="score",
                         greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(), eval_dataset=ToyClassification(n=4),
                      compute_metrics=best_at(2), callbacks=[LayerScheduleCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    # checkpoint-2 was saved after the switch at step 2: it lists layer 2, whose lora_B is still zero
    assert saved_config(tmp_path / "run" / "checkpoint-2")["ever_active_layers"] == [2, 3]
    assert trained_layers(model) == [3]
    assert model.ever_active_layers == [3]
    assert model.active_layers == [3]
    assert model.peft_config["default"].schedule_position == 2
    assert exported_layers(model, tmp_path / "export") == [3]
    # The best checkpoint of a later step keeps every layer that trained by then.
    later = bert({0: [3], 2: [2, 3], 3: [1, 2, 3]})
    trainer = Trainer(model=later, args=training_args(tmp_path / "later", **{k: getattr(args, k) for k in (
        "max_steps", EVAL_STRATEGY, "eval_steps", "save_strategy", "save_steps", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better")}), train_dataset=ToyClassification(),
        eval_dataset=ToyClassification(n=4), compute_metrics=best_at(3), callbacks=[LayerScheduleCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    assert later.ever_active_layers == [2, 3] == trained_layers(later)
    assert later.active_layers == [2, 3]


# ------------------------------------------------------------------- point 4 under Lightning


@pytest.fixture()
def lt():
    """helpers.lightning_training, with lightning imported (the test skips without it: tox env ``lightning``)."""
    pytest.importorskip("lightning.pytorch")
    from helpers import lightning_training

    return lightning_training


def _lightning_run(lt, root, schedule, callbacks, first=False, **options):
    from peft_layersched.lightning import LayerScheduleFinetuning

    model = lt.scheduled_bert(schedule, "step")
    module = options.pop("module", lt.ScheduledModule)(model)
    ours = [LayerScheduleFinetuning()]
    trainer = lt.trainer(root, callbacks + ours if first else ours + callbacks, **options)
    trainer.fit(module, lt.loader(), **({"val_dataloaders": lt.loader(4)} if "val_check_interval" in options else {}))
    return model, trainer


@pytest.mark.parametrize("last", [True, False], ids=["stopper-last", "stopper-first"])
def test_lightning_should_stop_at_a_switch_step_ends_like_max_steps(lt, tmp_path, last):
    import lightning.pytorch as pl

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= 2:
                trainer.should_stop = True

    schedule = {0: [3], 2: [2, 3]}
    ref, _ = _lightning_run(lt, tmp_path / "ref", schedule, [], max_steps=2)
    model, trainer = _lightning_run(lt, tmp_path / "stopped", schedule, [StopAt()], first=not last, max_steps=8)
    assert trainer.global_step == 2
    assert model.ever_active_layers == [3] == trained_layers(model) == ref.ever_active_layers
    assert model.active_layers == [3] == ref.active_layers
    assert model.peft_config["default"].schedule_position == 2 == ref.peft_config["default"].schedule_position
    a, b = lora(model), lora(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert exported_layers(model, tmp_path / "export") == [3]


def test_lightning_early_stopping_lists_only_layers_that_trained(lt, tmp_path):
    import lightning.pytorch as pl

    scores = [1.0, 0.5, 0.4, 0.3]

    class Scored(lt.ScheduledModule):
        calls = 0

        def validation_step(self, batch, batch_idx):
            pass

        def on_validation_epoch_end(self):
            type(self).calls += 1
            self.log("score", scores[type(self).calls - 1])

    stop = pl.callbacks.EarlyStopping(monitor="score", mode="max", patience=1, check_on_train_epoch_end=False)
    model, trainer = _lightning_run(lt, tmp_path, {0: [3], 2: [2, 3]}, [stop], max_steps=4, val_check_interval=1,
                                    module=Scored)
    assert trainer.global_step == 2, "EarlyStopping did not stop the fit after the second evaluation"
    assert model.ever_active_layers == [3] == trained_layers(model)
    assert model.active_layers == [3]
    assert exported_layers(model, tmp_path / "export") == [3]


# ------------------------------------------------- point 7b: a step AMP's GradScaler skipped


def _amp_loop(unscale, steps=6, skip_at=2):
    """A plain loop with AMP's GradScaler (CPU) and a chainable LR scheduler (x0.5 per step); the gradients of
    step ``skip_at`` are made inf, so the scaler skips that optimizer step.  Returns the model, each step's
    layer-group LRs (after sched.step(): those of the next step), active layers and LoRA weights."""
    from peft_layersched.training.engines import LAYER_KEY

    torch.manual_seed(0)
    model = bert({0: [3], 3: [2, 3]})
    optimizer = torch.optim.SGD(LayerScheduler.param_groups(model), lr=0.1)
    lr_scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    sched = LayerScheduler(model, optimizer)
    data = ToyClassification()
    seen = [({g[LAYER_KEY]: g["lr"] for g in optimizer.param_groups if LAYER_KEY in g}, model.active_layers,
             lora(model))]
    for step in range(1, steps + 1):
        rows = [(4 * step + i) % len(data) for i in range(4)]
        batch = {k: torch.stack([data[i][k] for i in rows]) for k in ("input_ids", "labels")}
        scaler.scale(model(**batch).loss).backward()
        if step == skip_at:
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        scaler.step(optimizer)
        scaler.update()
        if unscale:
            sched.unscale_lrs()
        lr_scheduler.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append(({g[LAYER_KEY]: g["lr"] for g in optimizer.param_groups if LAYER_KEY in g}, model.active_layers,
                     lora(model)))
    return model, seen


@cpu_grad_scaler
def test_a_skipped_amp_step_counts_and_the_lr_factors_stay_exact_with_unscale_lrs():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning of ours: the loop is right
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")  # torch's, about step order
        warnings.filterwarnings("ignore", message=".*GradScaler.*")
        model, seen = _amp_loop(unscale=True)
    # the skipped step (2) left every weight as it was
    assert all(torch.equal(seen[1][2][k], seen[2][2][k]) for k in seen[1][2])
    assert not all(torch.equal(seen[2][2][k], seen[3][2][k]) for k in seen[2][2])
    for n, (lrs, active, _) in enumerate(seen):
        # it counts as a step (like the LR scheduler's and the Trainer's global_step): layer 2 joins
        # after step 3, the skipped step included
        assert active == ([3] if n < 3 else [2, 3]), n
        expected = 0.1 * 0.5 ** n  # the LR scheduler's LR for step n + 1
        assert lrs[3] == pytest.approx(expected, rel=1e-12), n
        assert lrs[2] == (pytest.approx(expected, rel=1e-12) if n >= 3 else 0.0), n
    assert trained_layers(model) == [2, 3] == model.ever_active_layers


@cpu_grad_scaler
def test_a_skipped_amp_step_without_unscale_lrs_is_reported_with_the_fix():
    with pytest.warns(UserWarning, match=r"optimizer step was skipped.*sched\.unscale_lrs\(\) right before "
                                         r"lr_scheduler\.step\(\)"):
        _, seen = _amp_loop(unscale=False)
    assert seen[3][0][2] != pytest.approx(0.1 * 0.5 ** 3), "(what the warning is about: layer 2's LR is off)"
