"""``examples/accelerate_loop.py`` with 2 DDP processes (torchrun, gloo, CPU): ``LayerScheduler`` on the model
and optimizer ``accelerator.prepare`` returned."""

from __future__ import annotations

import json
import os

import pytest

from helpers.launch import torchrun

pytest.importorskip("accelerate", reason="examples/accelerate_loop.py needs accelerate")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate_loop.py")

pytestmark = pytest.mark.slow  # the example on 2 processes (torchrun)
LR, STEPS, WARMUP = 1e-2, 12, 4  # the example's; schedule {0: [3], 4: [2, 3], 8: [1]} in optimizer steps


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate")
    output = torchrun([EXAMPLE, "--output-dir", str(out)], "accelerate_loop.py run", timeout=300)
    assert "LoRA changed in exactly the scheduled layers at every step" in output, output[-6000:]
    return [json.load(open(os.path.join(str(out), "rank{}.json".format(rank)))) for rank in (0, 1)]


def _hashes(steps, layer, first, last):
    return [s["hashes"][layer] for s in steps if first <= s["step"] <= last]


def test_ranks_run_ddp_and_end_bitwise_identical(ranks):
    first, second = ranks
    assert first["world"] == second["world"] == 2, "accelerate did not run distributed"
    assert first["find_unused"] is True, "DDP must find unused parameters: frozen layers get no grad"
    assert first["wrong"] == second["wrong"] == []
    # Each rank got its own batches (other losses), and after every optimizer step both hold the same LoRA weights.
    assert [s.get("loss") for s in first["steps"]] != [s.get("loss") for s in second["steps"]]
    assert [s["hashes"] for s in first["steps"]] == [s["hashes"] for s in second["steps"]]
    assert [s["step"] for s in first["steps"]] == list(range(STEPS + 1))


def test_frozen_layers_stay_still_and_joining_layers_train(ranks):
    steps = ranks[0]["steps"]
    assert [s["trained"] for s in steps[1:]] == [[3]] * 4 + [[2, 3]] * 4 + [[1]] * 4
    for layer in ("2", "3"):  # frozen from step 8 on
        assert len(set(_hashes(steps, layer, 8, STEPS))) == 1, "layer {} moved while frozen".format(layer)
    assert len(set(_hashes(steps, "1", 0, 8))) == 1, "layer 1 moved before its phase"
    assert len(set(_hashes(steps, "2", 0, 4))) == 1, "layer 2 moved before its phase"
    # every step of a phase changes the weights of each layer it trains
    assert len(set(_hashes(steps, "2", 4, 8))) == 5 and len(set(_hashes(steps, "1", 8, STEPS))) == 5


def test_each_layer_lr_is_the_scheduled_lr_times_its_warm_up(ranks):
    for step in ranks[0]["steps"][1:]:
        s = step["step"]
        scheduled = LR * (1.0 - (s - 1) / STEPS)  # LambdaLR's linear decay, as accelerate steps it
        warm_up = {"3": 1.0, "2": min(1.0, (s - 4) / WARMUP), "1": min(1.0, (s - 8) / WARMUP)}
        expected = {layer: scheduled * warm_up[layer] if int(layer) in step["trained"] else 0.0 for layer in warm_up}
        assert step["lr"] == pytest.approx(expected, rel=1e-9, abs=0.0), "step {}".format(s)
    # the joining layers' first steps run at a quarter of the scheduled LR
    assert ranks[0]["steps"][5]["lr"]["2"] == pytest.approx(ranks[0]["steps"][5]["lr"]["3"] / 4)
