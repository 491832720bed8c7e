"""2-process sharded training (torchrun, gloo, CPU): DeepSpeed ZeRO-1/2/3 through the Trainer and
LayerScheduleCallback, FSDP2 and FSDP1 (use_orig_params=True) in a plain loop.

Per optimizer step every rank records the active layers and a hash of each layer's full LoRA weights
(tests/helpers/sharded_worker.py).  The schedule: layer 3 trains epochs 0-1 and is frozen from epoch 2
on, when layer 1 joins (4 optimizer steps per epoch, 4 epochs).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os

import pytest
import torch
from packaging.version import Version

from helpers import tiny_models
from helpers.launch import two_ranks

TORCH = Version(Version(torch.__version__).base_version)
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
FSDP_KINDS = ("fsdp2", "fsdp1")
ZERO_KINDS = ("zero1", "zero2", "zero3")

pytestmark = pytest.mark.slow  # 2 processes per run (torchrun: FSDP, DeepSpeed)
LR_SCALE = 0.5  # helpers.sharded_worker.LR_SCALE

needs_fsdp = pytest.mark.skipif(TORCH < Version("2.4"), reason=f"torch {torch.__version__}: fully_shard needs >= 2.4")
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed in this env (the matrix installs it in peft0212-tf5)"
)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    return two_ranks("sharded_worker", tmp_path_factory.mktemp("fsdp"), FSDP_KINDS, timeout=300)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory):
    return two_ranks("sharded_worker", tmp_path_factory.mktemp("zero"), ZERO_KINDS + ("zero2-adaptive",), timeout=900)


def ranks(out, kind):
    return [json.load(open(os.path.join(str(out), f"{kind}{rank}.json"))) for rank in (0, 1)]


def check_schedule(first, second):
    assert first["world"] == second["world"] == 2, "the run was not distributed"
    # Same active set and bitwise-identical LoRA weights on both ranks at every optimizer step.
    assert [(s["step"], s["active"], s["hashes"]) for s in first["steps"]] == [
        (s["step"], s["active"], s["hashes"]) for s in second["steps"]]
    steps = {s["step"]: s for s in first["steps"]}
    assert sorted(steps) == list(range(17))
    assert steps[0]["hashes"]["3"] != steps[8]["hashes"]["3"], "layer 3 never trained"
    assert len({steps[t]["hashes"]["3"] for t in range(8, 17)}) == 1, "layer 3 moved while frozen"
    assert len({steps[t]["hashes"]["1"] for t in range(0, 9)}) == 1, "layer 1 moved before its phase"
    assert len({steps[t]["hashes"]["1"] for t in range(8, 17)}) == 9, "layer 1 did not train at every step"
    return steps


@needs_fsdp
@pytest.mark.parametrize("kind", FSDP_KINDS)
def test_fsdp_plain_loop_keeps_ranks_identical_and_frozen_layers_still(fsdp_run, kind):
    first, second = ranks(fsdp_run, kind)
    assert first["engine"] == ("FullyShardedDataParallel" if kind == "fsdp1" else first["engine"])
    check_schedule(first, second)


@needs_deepspeed
@pytest.mark.parametrize("kind", ZERO_KINDS)
def test_deepspeed_zero_trainer_keeps_the_guarantees(zero_run, kind):
    first, second = ranks(zero_run, kind)
    assert first["engine"] == "DeepSpeedEngine"
    steps = check_schedule(first, second)
    # Each layer has its own param group: a frozen or not-yet-active layer runs at LR 0, a layer that
    # joins later at new_layer_lr_scale x the scheduled LR (recorded after each step: the next step's LR).
    for t, record in steps.items():
        lrs, scheduled = record["lrs"], record["scheduled_lr"]
        if t < 8:
            assert lrs == {"1": 0.0, "3": pytest.approx(scheduled)}, t
        elif t > 8:
            assert lrs == {"1": pytest.approx(LR_SCALE * scheduled), "3": 0.0}, t


@needs_deepspeed
def test_deepspeed_resume_mid_schedule_is_bitwise_identical(zero_run):
    first, second = ranks(zero_run, "zero2")
    assert first["resumed"] == second["resumed"]
    resumed = {s["step"]: s for s in first["resumed"]}
    uninterrupted = {s["step"]: s for s in first["steps"]}
    assert min(resumed) == 6 and resumed[6]["active"] == [3]
    for t in range(6, 17):
        assert resumed[t]["hashes"] == uninterrupted[t]["hashes"], t
        assert resumed[t]["active"] == uninterrupted[t]["active"], t


@needs_deepspeed
def test_deepspeed_zero2_adaptive_decisions_are_identical_and_resume_bitwise(zero_run):
    first, second = ranks(zero_run, "zero2-adaptive")
    decisions = first["decisions"]
    assert decisions == second["decisions"] and [d["t"] for d in decisions] == list(range(0, 16, 2))
    assert len({tuple(d["layers"]) for d in decisions}) > 1, "the schedule never changed its choice"
    assert any(v != 1.0 for d in decisions[1:] for v in d["scores"].values()), "no measured score was used"
    assert [(s["step"], s["active"], s["hashes"]) for s in first["steps"]] == [
        (s["step"], s["active"], s["hashes"]) for s in second["steps"]]
    steps = {s["step"]: s for s in first["steps"]}
    for step in range(1, 17):
        chosen = [d for d in decisions if d["t"] <= step - 1][-1]["layers"]
        assert steps[step - 1]["active"] == chosen
        for layer, digest in steps[step]["hashes"].items():
            if int(layer) not in chosen:  # LR 0 under ZeRO: bitwise still all the same
                assert digest == steps[step - 1]["hashes"][layer], (step, layer)
    # resumed from the checkpoint of step 8: the same decisions and weights from there on
    assert first["resumed_decisions"] == decisions
    resumed = {s["step"]: s for s in first["resumed"]}
    for t in range(8, 17):
        assert resumed[t]["hashes"] == steps[t]["hashes"], t


@needs_deepspeed
def test_zero3_saves_the_full_adapter_and_it_loads_without_deepspeed(zero_run):
    from peft import PeftModel

    import peft_layersched  # noqa: F401  (registers SCHEDULED_LORA: what a user imports to load it)

    final = ranks(zero_run, "zero3")[0]["steps"][-1]["hashes"]
    model = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), os.path.join(str(zero_run), "zero3", "adapter"))
    for layer, params in model.base_model.layer_parameters().items():
        digest = hashlib.sha256()
        for param in params:
            digest.update(param.detach().float().cpu().clone().numpy().tobytes())
        assert digest.hexdigest()[:16] == final[str(layer)], layer
    assert model.ever_active_layers == [1, 3]
