"""The progressive schedule kind: the chance that a layer trains rises to 1 at `full_at` of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_layersched import LayerScheduler, ScheduledLoraConfig, export_lora
from peft_layersched.schedules import parse_schedule

from helpers.toy_training import ToyClassification, scheduled_bert, train

LAYERS = list(range(6))


def bound(**spec):
    return parse_schedule(dict({"type": "progressive"}, **spec)).bind(LAYERS)


# ---------------------------------------------------------------------------------- the schedule itself


@settings(max_examples=60, deadline=None)
@given(start=st.floats(0.0, 1.0), full_at=st.floats(0.05, 1.0), steps=st.integers(1, 400),
       every=st.integers(1, 5), seed=st.integers(0, 10 ** 6))
def test_the_chance_rises_linearly_and_every_layer_trains_from_full_at(start, full_at, steps, every, seed):
    schedule = bound(start=start, full_at=full_at, steps=steps, every=every, seed=seed)
    for t in range(0, steps + every, max(1, steps // 40)):
        period = (t // every) * every
        expected = 1.0 if start >= 1.0 else min(1.0, start + (1 - start) * period / (full_at * steps))
        assert schedule.probability(t) == pytest.approx(expected)
        active = schedule.active_at(t)
        assert active, "no layer at t=%d" % t
        assert active == sorted(set(active)) and set(active) <= set(LAYERS)
        if period >= full_at * steps:
            assert active == LAYERS
        assert active == schedule.active_at(period), "the set changed inside a period"


def test_draws_depend_on_the_seed_and_period_only():
    one, again, other = bound(steps=100, seed=1), bound(steps=100, seed=1), bound(steps=100, seed=2)
    first = [one.active_at(t) for t in range(75)]
    assert first == [again.active_at(t) for t in range(75)]
    assert first == [one.active_at(t) for t in reversed(range(75))][::-1], "depends on the order of queries"
    assert first != [other.active_at(t) for t in range(75)]
    # the share of active layers tracks the chance: ~0.1 early, ~0.8 around t=50
    early = sum(len(one.active_at(t)) for t in range(0, 10)) / 60.0
    late = sum(len(one.active_at(t)) for t in range(45, 55)) / 60.0
    assert early < 0.35 < 0.6 < late


def test_layers_until_and_run_start_agree_with_brute_force():
    schedule = bound(steps=60, seed=4, every=2)
    seen = set()
    for t in range(70):
        seen.update(schedule.active_at(t))
        assert schedule.layers_until(t) == sorted(seen)
        for layer in LAYERS:
            start = schedule.run_start(layer, t)
            if layer not in schedule.active_at(t):
                assert start is None
            else:
                s = t - t % 2
                while s > 0 and layer in schedule.active_at(s - 2):
                    s -= 2
                assert start == s


def test_without_a_length_time_zero_works_and_later_times_say_what_is_missing():
    schedule = bound(seed=0)
    assert schedule.active_at(0)
    with pytest.raises(ValueError, match=r"needs the run's length.*LayerScheduler\(total_steps=.*'steps'"):
        schedule.active_at(5)


def test_to_json_round_trips_and_the_driver_completes_the_length():
    spec = parse_schedule({"type": "progressive", "start": 0.2, "seed": 3, "layers": [4, 5]})
    assert spec.needs_run_length
    done = spec.with_run_length(40)
    assert not done.needs_run_length
    assert done.to_json() == {"type": "progressive", "start": 0.2, "full_at": 0.75, "every": 1, "seed": 3,
                              "steps": 40, "layers": [4, 5]}
    assert parse_schedule(done.to_json()).to_json() == done.to_json()
    assert "steps" not in spec.to_json()


# ---------------------------------------------------------------------------------- with a driver


class _Active(object):
    """Records the LoRA layers that require grad at each optimizer step of a Trainer run."""

    def __init__(self):
        from transformers import TrainerCallback

        record = self.steps = []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                record.append(sorted(model.base_model.active_layers))

        self.callback = Callback()


def test_trainer_run_follows_the_schedule_of_its_length_and_saves_it(tmp_path):
    from peft_layersched import LayerScheduleCallback

    spec = {"type": "progressive", "start": 0.1, "full_at": 0.5, "seed": 7}
    model = scheduled_bert(spec, unit="step", num_layers=4)
    seen = _Active()
    trainer = train(model, tmp_path / "run", callbacks=[LayerScheduleCallback(), seen.callback],
                    dataset=ToyClassification(n=32), num_train_epochs=2)
    steps = trainer.state.max_steps
    assert steps == 16
    expected = parse_schedule(dict(spec, steps=steps)).bind(list(range(4)))
    assert seen.steps == [expected.active_at(t) for t in range(steps)]
    assert seen.steps[-1] == [0, 1, 2, 3] and len(seen.steps[0]) < 4
    saved = model.peft_config["default"].layer_schedule
    assert saved["steps"] == steps and saved["seed"] == 7
    model.save_pretrained(str(tmp_path / "adapter"))
    with open(os.path.join(str(tmp_path / "adapter"), "adapter_config.json")) as f:
        assert json.load(f)["layer_schedule"]["steps"] == steps
    assert "steps" not in spec
    export_lora(model, str(tmp_path / "export"))
    assert os.path.exists(os.path.join(str(tmp_path / "export"), "adapter_config.json"))


def test_trainer_resume_from_a_checkpoint_is_bitwise(tmp_path):
    from peft_layersched import LayerScheduleCallback

    spec = {"type": "progressive", "start": 0.2, "full_at": 0.75, "seed": 1}

    def run(out, resume=None, **args):
        model = scheduled_bert(spec, unit="step", num_layers=4)
        train(model, out, callbacks=[LayerScheduleCallback()], dataset=ToyClassification(n=32), resume=resume,
              num_train_epochs=3, **args)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    whole = run(tmp_path / "whole", save_strategy="no")
    run(tmp_path / "cut", save_strategy="steps", save_steps=8)
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-8"), save_strategy="no")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_plain_loop_needs_the_run_length():
    model = scheduled_bert({"type": "progressive"}, unit="step", num_layers=4)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-3)
    with pytest.raises(ValueError, match=r"needs the run's length.*LayerScheduler\(total_steps=\.\.\.\)"):
        LayerScheduler(model, optimizer)
    sched = LayerScheduler(model, optimizer, total_steps=20)
    assert model.peft_config["default"].layer_schedule["steps"] == 20
    assert sched.active_layers


def test_the_users_config_is_left_as_given():
    from peft import get_peft_model

    from helpers import tiny_models

    spec = {"type": "progressive", "seed": 2}
    config = ScheduledLoraConfig(r=4, target_modules=["query", "value"], layer_schedule=spec, schedule_unit="step",
                                 task_type="SEQ_CLS")
    before = json.dumps(config.layer_schedule, sort_keys=True)
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-3)
    LayerScheduler(model, optimizer, total_steps=12)
    assert model.peft_config["default"].layer_schedule["steps"] == 12
    assert json.dumps(config.layer_schedule, sort_keys=True) == before
    assert "steps" not in config.layer_schedule
    assert spec == {"type": "progressive", "seed": 2}


@pytest.mark.slow  # a process of its own
def test_plan_shows_the_ramp(config_folders, tmp_path):
    config = json.dumps({"layer_schedule": {"type": "progressive", "start": 0.1, "full_at": 0.5, "seed": 0},
                         "schedule_unit": "step", "target_modules": ["query", "value"], "r": 4})
    out = subprocess.run(
        [sys.executable, "-m", "peft_layersched.cli", "plan", "--model", config_folders["bert6"], "--config", config,
         "--steps", "40"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert out.returncode == 0, out.stdout
    assert "progressive: each layer trains with a chance rising from 0.1 to 1 at 50 % of 40 steps" in out.stdout
