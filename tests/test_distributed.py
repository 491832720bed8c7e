"""Real 2-process DDP training (torchrun, gloo, CPU) with the Trainer and LayerScheduleCallback."""

from __future__ import annotations

import json
import os

import pytest

from helpers.launch import two_ranks

KINDS = ("epoch", "step")

pytestmark = pytest.mark.slow  # 2 processes (torchrun)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    kinds = KINDS + ("adaptive", "progressive", "refuse")
    return two_ranks("ddp_worker", tmp_path_factory.mktemp("ddp"), kinds, timeout=300)


def _ranks(out, kind):
    return [json.load(open(os.path.join(str(out), "{}{}.json".format(kind, rank)))) for rank in (0, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_ranks_stay_identical_and_frozen_layers_stay_put(ddp_run, kind):
    first, second = _ranks(ddp_run, kind)
    assert first["world"] == second["world"] == 2, "the Trainer did not run distributed"
    assert first["find_unused"] is True, "DDP must find unused parameters: frozen layers get no grad"
    # Same active set and bitwise-identical LoRA weights on both ranks at every optimizer step.
    assert first["steps"] == second["steps"]
    steps = first["steps"]
    if kind == "epoch":  # 4 steps per epoch: layer 3 trains epochs 0-1, frozen after; layer 1 joins at 2
        frozen = [s["hashes"]["3"] for s in steps if s["step"] >= 8]
        assert len(set(frozen)) == 1, "layer 3 moved while frozen"
        assert steps[0]["hashes"]["3"] != steps[8]["hashes"]["3"], "layer 3 never trained"
        assert steps[0]["hashes"]["1"] == steps[8]["hashes"]["1"], "layer 1 moved before its phase"
        assert steps[8]["hashes"]["1"] != steps[-1]["hashes"]["1"], "layer 1 never trained after joining"
        # recorded at on_step_end; the epoch switch comes at the next on_epoch_begin
        assert [s["active"] for s in steps if s["step"] in (0, 8, 9)] == [[3], [3], [1]]
    else:  # {0: [3], 3: [1, 3], 6: [2]} in optimizer steps
        assert [s["active"] for s in steps if s["step"] in (0, 2, 3, 5, 6)] == [[3], [3], [1, 3], [1, 3], [2]]
        late = [s["hashes"]["3"] for s in steps if s["step"] >= 6]
        assert len(set(late)) == 1, "layer 3 moved while frozen"
        assert steps[6]["hashes"]["2"] != steps[-1]["hashes"]["2"], "layer 2 never trained"


def test_find_unused_parameters_false_is_refused(ddp_run):
    for result in _ranks(ddp_run, "refuse"):
        assert result["message"] is not None, "the callback accepted ddp_find_unused_parameters=False"
        assert "ddp_find_unused_parameters=True" in result["message"]


def test_adaptive_decisions_are_identical_on_both_ranks(ddp_run):
    first, second = _ranks(ddp_run, "adaptive")
    assert first["world"] == 2
    decisions = first["decisions"]
    assert decisions == second["decisions"], "the ranks decided differently"
    assert [d["t"] for d in decisions] == list(range(0, 16, 2))  # 32 samples, 2 ranks x 4: 16 steps in 4 epochs
    assert len({tuple(d["layers"]) for d in decisions}) > 1, "the schedule never changed its choice"
    assert first["steps"] == second["steps"], "the ranks' weights or active sets differ"
    measured = [d for d in decisions[1:] if any(v not in (1.0,) for v in d["scores"].values())]
    assert measured, "no decision used a measured score"
    by_step = {s["step"]: s for s in first["steps"]}
    for step in range(1, 17):
        chosen = [d for d in decisions if d["t"] <= step - 1][-1]["layers"]
        for layer, digest in by_step[step]["hashes"].items():
            if int(layer) not in chosen:
                assert digest == by_step[step - 1]["hashes"][layer], "layer {} moved while frozen".format(layer)


def test_progressive_draws_are_identical_on_both_ranks_and_follow_the_run_length(ddp_run):
    from peft_layersched.schedules import parse_schedule

    first, second = _ranks(ddp_run, "progressive")
    assert first["world"] == 2
    assert first["steps"] == second["steps"], "the ranks' weights or active sets differ"
    # 32 samples, 2 ranks x 4: 16 optimizer steps in 4 epochs; the Trainer gave the schedule that length
    expected = parse_schedule({"type": "progressive", "start": 0.2, "full_at": 0.5, "seed": 5, "steps": 16})
    schedule = expected.bind(list(range(4)))
    # step s's record is taken after it: the active set is the next step's
    assert [s["active"] for s in first["steps"][:-1]] == [schedule.active_at(t) for t in range(16)]
    assert first["steps"][0]["active"] != [0, 1, 2, 3] and first["steps"][-2]["active"] == [0, 1, 2, 3]
