"""Adaptive schedules (``adaptive``, ``autofreeze``): spec errors, the decision rules (pure), real Trainer and
plain-loop runs whose decisions follow the logged scores, trackers, resume (in-process and after SIGKILL),
reload-and-continue, and calibration that leaves the data order alone."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from transformers import TrainerCallback

from peft_layersched import LayerScheduleCallback, LayerScheduler, export_lora
from peft_layersched.cli import main as cli_main
from peft_layersched.schedules import parse_schedule
from peft_layersched.schedules.adaptive import percentile

from helpers import tiny_models
from helpers.snapshots import lora, same
from helpers.toy_training import ToyClassification, scheduled_bert, train

LAYERS = list(range(6))
TOP = {"type": "adaptive", "k": 2, "every": 3, "policy": "top", "explore": 0}


def assert_top_k(decision, k):
    """The chosen layers are k of the highest-scoring ones (ties may go either way)."""
    scores = {int(layer): value for layer, value in decision["scores"].items()}
    chosen = [int(layer) for layer in decision["layers"]]
    assert len(chosen) == k
    kth = sorted(scores.values(), reverse=True)[k - 1]
    assert all(scores[layer] >= kth for layer in chosen), decision
    assert all(scores[layer] <= kth for layer in scores if layer not in chosen), decision


# ------------------------------------------------------------------------------------ bad specs

BAD_SPECS = [
    # (id, spec, exception, words the message must hold)
    ("unknown-key", {"type": "adaptive", "kk": 2}, ValueError, ["unknown key", "'k'"]),
    ("k-zero", {"type": "adaptive", "k": 0}, ValueError, ["'k' must be >= 1"]),
    ("bad-signal", {"type": "adaptive", "signal": "loss"}, ValueError, ["'signal' must be one of", "grad_norm"]),
    ("bad-policy", {"type": "adaptive", "policy": "greedy"}, ValueError, ["'policy'", "'top'"]),
    ("explore-high", {"type": "adaptive", "explore": 1.5}, ValueError, ["'explore' must be >= 0.0 and <= 1.0"]),
    ("temperature-zero", {"type": "adaptive", "temperature": 0}, ValueError, ["'temperature' must be > 0"]),
    ("weights-negative", {"type": "adaptive", "weights": {"0": -1}}, ValueError, ["'weights'['0']", ">= 0"]),
    ("weights-not-dict", {"type": "adaptive", "weights": [1, 2]}, TypeError, ["'weights' must be a non-empty dict"]),
    ("weights-signal-without", {"type": "adaptive", "signal": "weights"}, ValueError, ["no 'weights'"]),
    ("ema-one", {"type": "adaptive", "ema": 1.0}, ValueError, ["'ema' must be < 1"]),
    ("decisions-out-of-order", {"type": "adaptive", "decisions": [{"t": 3, "layers": [0]}, {"t": 1, "layers": [1]}]},
     ValueError, ["times must increase"]),
    ("autofreeze-static-signal", {"type": "autofreeze", "signal": "outlier"}, ValueError,
     ["'signal' must be one of", "'update'"]),
    ("autofreeze-percentile", {"type": "autofreeze", "percentile": 120}, ValueError, ["'percentile' must be"]),
    ("autofreeze-min-active", {"type": "autofreeze", "min_active": 0}, ValueError, ["'min_active' must be >= 1"]),
]

BAD_BINDINGS = [
    ("k-over-eligible", {"type": "adaptive", "k": 2, "layers": [0, 1, 2], "weights": {"0": 0, "1": 0}},
     ["only 1 candidate layer(s) can be chosen", "weight-0"]),
    ("weights-not-candidate", {"type": "adaptive", "layers": [0, 1], "weights": {"4": 1}}, ["not a candidate"]),
    ("all-always", {"type": "adaptive", "layers": [0, 1], "always": [0, 1]}, ["no candidate layer is left"]),
    ("decision-not-candidate", {"type": "adaptive", "layers": [0, 1], "decisions": [{"t": 0, "layers": [5]}]},
     ["chose layer(s) [5]", "not candidates"]),
    ("autofreeze-comes-back",
     {"type": "autofreeze", "decisions": [{"t": 1, "layers": [1, 2]}, {"t": 2, "layers": [0, 2]}]},
     ["come back", "only freezes"]),
    ("autofreeze-min-active-over", {"type": "autofreeze", "layers": [0, 1], "min_active": 3}, ["'min_active' is 3"]),
]


@pytest.mark.parametrize("spec,error,words", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_specs_are_refused_saying_what_is_valid(spec, error, words):
    with pytest.raises(error) as raised:
        parse_schedule(spec)
    for word in words:
        assert word in str(raised.value)
    assert "layer_schedule (type" in str(raised.value)


@pytest.mark.parametrize("spec,words", [c[1:] for c in BAD_BINDINGS], ids=[c[0] for c in BAD_BINDINGS])
def test_bad_specs_on_a_model_are_refused(spec, words):
    with pytest.raises(ValueError) as raised:
        parse_schedule(spec).bind(LAYERS)
    for word in words:
        assert word in str(raised.value)


def test_a_config_with_a_bad_adaptive_schedule_is_refused_at_construction():
    from peft_layersched import ScheduledLoraConfig

    with pytest.raises(ValueError, match="'policy'"):
        ScheduledLoraConfig(target_modules=["query"], layer_schedule={"type": "adaptive", "policy": "best"})


# ------------------------------------------------------------------------------------ the rules (pure)

scores_strategy = st.dictionaries(
    st.sampled_from(LAYERS), st.one_of(st.none(), st.floats(0, 1e3, allow_nan=False)), min_size=0, max_size=6
)


@settings(max_examples=150, deadline=None)
@given(scores=scores_strategy, k=st.integers(1, 5), t=st.integers(0, 1000), seed=st.integers(0, 5))
def test_top_without_exploration_chooses_the_top_k_of_the_logged_scores(scores, k, t, seed):
    schedule = parse_schedule(dict(TOP, k=k, every=1, seed=seed)).bind(LAYERS)
    decision = schedule.decide(t, scores)
    assert_top_k(decision, k)
    assert schedule.active_at(t) == decision["layers"]
    # an untried layer scores above every measured one: it is tried next
    measured = [v for v in scores.values() if v is not None]
    for layer in LAYERS:
        if scores.get(layer) is None and measured and max(measured) > 0:
            assert decision["scores"][layer] > max(measured)


@settings(max_examples=150, deadline=None)
@given(scores=scores_strategy, zero=st.sets(st.sampled_from(LAYERS), max_size=3),
       policy=st.sampled_from(["top", "sample"]),
       explore=st.floats(0, 1), t=st.integers(0, 10000))
def test_weight_zero_layers_are_never_chosen(scores, zero, policy, explore, t):
    weights = {str(layer): (0 if layer in zero else 1.5) for layer in LAYERS}
    spec = {"type": "adaptive", "k": 2, "policy": policy, "explore": explore, "weights": weights, "signal": "grad_norm"}
    schedule = parse_schedule(spec).bind(LAYERS)
    decision = schedule.decide(t, scores)
    assert not set(decision["layers"]) & zero and len(decision["layers"]) == 2


@settings(max_examples=100, deadline=None)
@given(series=st.lists(st.dictionaries(st.sampled_from(LAYERS), st.floats(0, 10, allow_nan=False), min_size=6,
                                       max_size=6), min_size=1, max_size=12),
       pct=st.floats(0, 100), min_active=st.integers(1, 3))
def test_autofreeze_never_reactivates_and_freezes_bottom_up(series, pct, min_active):
    spec = {"type": "autofreeze", "every": 2, "percentile": pct, "min_active": min_active}
    schedule = parse_schedule(spec).bind(LAYERS)
    before = list(LAYERS)
    for i, measured in enumerate(series):
        t = 2 * (i + 1)
        assert schedule.due(t) == t
        decision = schedule.decide(t, measured)
        now = decision["layers"]
        assert set(now) <= set(before), "a frozen layer came back"
        assert now == before[len(before) - len(now):], "layers must leave bottom-up"
        assert len(now) >= min(min_active, len(before))
        before = now
    replayed = parse_schedule(json.loads(json.dumps(schedule.as_spec().to_json()))).bind(LAYERS)
    assert [replayed.active_at(t) for t in range(30)] == [schedule.active_at(t) for t in range(30)]


def test_autofreeze_follows_the_rule_on_a_worked_example():
    schedule = parse_schedule({"type": "autofreeze", "every": 10, "percentile": 50}).bind([0, 1, 2, 3])
    assert schedule.due(0) is None and schedule.active_at(0) == [0, 1, 2, 3]
    schedule.decide(10, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})  # the first interval: a baseline, nobody leaves
    decision = schedule.decide(20, {0: 1.01, 1: 1.02, 2: 1.5, 3: 2.0})  # rates .01 .02 .5 1.0; median .26
    assert decision["layers"] == [2, 3] and decision["threshold"] == pytest.approx(0.26)
    assert schedule.active_at(25) == [2, 3] and schedule.run_start(3, 25) == 0


@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30), q=st.floats(0, 100))
def test_percentile_is_numpys_linear_one(values, q):
    numpy = pytest.importorskip("numpy")
    assert percentile(values, q) == pytest.approx(float(numpy.percentile(values, q)), rel=1e-9, abs=1e-9)


def test_sampling_is_seeded_and_follows_the_scores():
    spec = {"type": "adaptive", "k": 1, "policy": "sample", "explore": 0.0, "temperature": 1.0}
    schedule = parse_schedule(spec).bind([0, 1])
    picks = [schedule.decide(t, {0: 1.0, 1: 3.0})["layers"][0] for t in range(2000)]
    assert 0.70 < picks.count(1) / 2000.0 < 0.80  # p = 3/4
    again = parse_schedule(spec).bind([0, 1])
    assert [again.decide(t, {0: 1.0, 1: 3.0})["layers"][0] for t in range(2000)] == picks


# ------------------------------------------------------------------------------------ Trainer runs


class Logs(TrainerCallback):
    def __init__(self):
        self.records = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.records.append((state.global_step, dict(logs or {})))


def decisions_of(trainer):
    entry = [e for e in trainer.state.log_history if "layer_schedule_adaptive" in e]
    assert len(entry) == 1, "one state entry in the log history"
    return entry[0]["layer_schedule_adaptive"]["decisions"]


@pytest.mark.parametrize("signal", ["grad_norm", "update"])
def test_trainer_top_k_follows_the_logged_scores_and_trackers_see_each_decision(tmp_path, signal):
    model = scheduled_bert(dict(TOP, signal=signal), unit="step", num_layers=4, dropout=0.0)
    logs = Logs()
    weights = []

    class Weights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            weights.append((state.global_step, model.active_layers, lora(model)))

    trainer = train(model, tmp_path, callbacks=[LayerScheduleCallback(), logs, Weights()], max_steps=12,
                    logging_steps=100)
    decisions = decisions_of(trainer)
    assert [d["t"] for d in decisions] == [0, 3, 6, 9]
    for decision in decisions:
        assert_top_k(decision, 2)
    # measured layers have measured scores (not the prior) after they trained
    assert any(v not in (1.0,) for v in decisions[-1]["scores"].values())
    # every decision reached the trackers at the step it was made, scores and chosen set
    logged = {step: rec for step, rec in logs.records if "layer_schedule/decision_time" in rec}
    for decision in decisions:
        step = max(decision["t"], 1)
        record = logged[step]
        assert record["layer_schedule/decision_time"] == decision["t"]
        for layer, score in decision["scores"].items():
            assert record[f"layer_schedule/score/{layer}"] == score
            assert record[f"layer_schedule/chosen/{layer}"] == float(int(layer) in decision["layers"])
    # the active set is the decision's; frozen layers stay bitwise still
    by_step = {step: (active, w) for step, active, w in weights}
    for step in range(1, 12):
        chosen = [d for d in decisions if d["t"] <= step][-1]["layers"]
        assert by_step[step][0] == chosen
        if step > 1:
            previous_active = by_step[step - 1][0]
            for name, value in by_step[step][1].items():
                layer = int(name.split(".layer.")[1].split(".")[0])
                if layer not in previous_active:
                    assert torch.equal(value, by_step[step - 1][1][name]), f"{name} moved while frozen"
    # the saved adapter config holds the realized schedule
    assert model.peft_config["default"].layer_schedule["decisions"] == decisions


def test_autofreeze_in_a_trainer_run_only_freezes(tmp_path):
    spec = {"type": "autofreeze", "every": 2, "percentile": 90}
    model = scheduled_bert(spec, unit="step", num_layers=4, dropout=0.0)
    trainer = train(model, tmp_path, max_steps=16, logging_steps=100)
    decisions = decisions_of(trainer)
    assert [d["t"] for d in decisions] == [2, 4, 6, 8, 10, 12, 14]
    sets = [d["layers"] for d in decisions]
    for before, after in zip(sets, sets[1:]):
        assert set(after) <= set(before)
    assert len(sets[-1]) < 4, "nothing froze with percentile 90 over 16 steps"
    assert all("rates" in d for d in decisions[1:])


@pytest.mark.parametrize("spec", [
    {"type": "adaptive", "k": 1, "every": 1, "policy": "sample", "explore": 0.2},
    {"type": "autofreeze", "every": 2, "percentile": 75},
], ids=["adaptive-step", "autofreeze-step"])
def test_resume_from_a_checkpoint_is_bitwise(tmp_path, spec):
    # 16 samples, batch 4: 4 steps per epoch; the checkpoint at step 8 ends an epoch
    def run(out, resume=None):
        model = scheduled_bert(spec, unit="step", num_layers=4, dropout=0.0)
        trainer = train(model, out, max_steps=12, save_strategy="steps", save_steps=8, logging_steps=100,
                        resume=resume)
        return model, trainer

    whole, whole_trainer = run(tmp_path / "whole")
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=str(tmp_path / "whole" / "checkpoint-8"))
    assert decisions_of(resumed_trainer) == decisions_of(whole_trainer)
    assert same(lora(whole), lora(resumed))


def test_a_saved_adapter_reloads_and_continues_its_decisions(tmp_path, capsys):
    model = scheduled_bert(TOP, unit="step", num_layers=4, dropout=0.0)
    first = train(model, tmp_path / "one", max_steps=7, logging_steps=100)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.load(open(str(tmp_path / "adapter" / "adapter_config.json")))["layer_schedule"]
    assert [d["t"] for d in saved["decisions"]] == [0, 3, 6] and saved["state"]["seen"]
    assert saved["decisions"] == decisions_of(first)

    loaded = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), str(tmp_path / "adapter"), is_trainable=True)
    schedule = loaded.base_model.scheduled_adapter().schedule
    assert [d["t"] for d in schedule.decisions] == [0, 3, 6]
    assert schedule.active_at(7) == sorted(saved["decisions"][-1]["layers"])
    second = train(loaded, tmp_path / "two", max_steps=5, logging_steps=100,
                   callbacks=[LayerScheduleCallback(schedule_start="continue")])
    times = [d["t"] for d in decisions_of(second)]
    assert times == [0, 3, 6, 9], "the second stage goes on from schedule step 7: one new decision at 9"
    assert decisions_of(second)[:3] == saved["decisions"]

    export_lora(loaded, str(tmp_path / "exported"))
    assert os.path.exists(str(tmp_path / "exported" / "adapter_config.json"))
    cli_main(["inspect", str(tmp_path / "adapter")])
    shown = capsys.readouterr().out
    assert "adaptive" in shown and "decision" in shown


def test_outlier_calibration_leaves_the_rng_and_the_data_order_alone():
    spec = {"type": "adaptive", "k": 2, "every": 2, "signal": "outlier", "calibration_batches": 3}
    model = scheduled_bert(spec, unit="step", num_layers=4, dropout=0.1)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    data = ToyClassification(n=16)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    sched = LayerScheduler(model, optimizer, calibration_data=loader)
    assert torch.equal(torch.get_rng_state(), before)
    decision = sched.last_decision
    assert decision["t"] == 0 and sched.meter.calibrated
    scores = decision["scores"]
    assert all(0.0 <= v <= 1.0 for v in scores.values()) and len(set(scores.values())) > 1
    assert model.training, "calibration put the model back in training mode"


def test_outlier_without_data_says_how_to_give_it():
    model = scheduled_bert({"type": "adaptive", "signal": "outlier"}, unit="step", num_layers=4)
    with pytest.raises(ValueError, match="calibration_data="):
        LayerScheduler(model, torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2))


def test_plain_loop_resume_from_state_dict_is_bitwise():
    spec = {"type": "adaptive", "k": 2, "every": 2, "policy": "sample", "signal": "grad_norm"}

    def batch(step):
        data = ToyClassification(n=16, seed=step)
        return {"input_ids": data.ids[:4], "labels": data.labels[:4]}

    def build():
        torch.manual_seed(0)
        model = scheduled_bert(spec, unit="step", num_layers=4, dropout=0.0)
        optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
        return model, optimizer

    def loop(model, optimizer, sched, start, end):
        for step in range(start, end):
            torch.manual_seed(step)  # the base model's dropout: the same draws whether resumed or not
            model(**batch(step)).loss.backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)

    model, optimizer = build()
    sched = LayerScheduler(model, optimizer, total_steps=10)
    loop(model, optimizer, sched, 0, 5)
    saved = json.loads(json.dumps({"sched": sched.state_dict()}))["sched"]
    saved_weights = copy.deepcopy(model.state_dict())  # LoRA and the classifier head (modules_to_save)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    loop(model, optimizer, sched, 5, 10)
    whole = lora(model)

    again, optimizer2 = build()
    again.load_state_dict(saved_weights)
    optimizer2.load_state_dict(saved_optimizer)
    sched2 = LayerScheduler(again, optimizer2, total_steps=10, state_dict=saved)
    loop(again, optimizer2, sched2, 5, 10)
    assert sched2.state_dict()["adaptive"]["decisions"] == sched.state_dict()["adaptive"]["decisions"]
    assert same(lora(again), whole)


@pytest.mark.slow  # processes of their own
def test_sigkill_mid_run_then_resume_ends_bitwise_equal(tmp_path):
    """A real SIGKILL (no handler runs) after the checkpoint of step 8, in another process; the resumed run
    ends with the weights and the decisions of the run that was never interrupted."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "adaptive_worker.py")
    killed = subprocess.run([sys.executable, script, str(tmp_path / "killed"), "kill-after-8"],
                            cwd=os.path.dirname(script), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=300)
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert os.path.isdir(str(tmp_path / "killed" / "checkpoint-8"))
    for kind in ("whole", "resume"):
        out = tmp_path / ("killed" if kind == "resume" else "whole")
        done = subprocess.run([sys.executable, script, str(out), kind], cwd=os.path.dirname(script),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:]
    whole = json.load(open(str(tmp_path / "whole" / "result.json")))
    resumed = json.load(open(str(tmp_path / "killed" / "result.json")))
    assert resumed["decisions"] == whole["decisions"] and len(whole["decisions"]) == 6
    assert resumed["hashes"] == whole["hashes"]


def test_the_adaptive_core_is_pure_python():
    import ast

    import peft_layersched.schedules.adaptive as adaptive

    tree = ast.parse(open(adaptive.__file__).read())
    nodes = list(ast.walk(tree))
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    assert imported <= {"__future__", "copy", "math", "typing"}, imported
