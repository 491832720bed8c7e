"""A plain loop resumed from ``LayerScheduler.state_dict()`` is the run that would have happened, in every order
docs/loops.md gives (the weights loaded after ``LayerScheduler(..., state_dict=)``, before it, or after
``sched.load_state_dict``), for a fixed schedule and an adaptive one on every measured signal, in one process
and under 2-rank DDP with different data per rank: the final LoRA weights bitwise, the scheduler's whole
``state_dict`` (decisions, signal state, ``switch_steps``) and the adapter's config equal the uninterrupted
run's, after a second resume too, and no warning is given."""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest
import torch
from transformers import Trainer

from peft_layersched import LayerScheduleCallback

from helpers import plain_resume
from helpers.jit import SigtermAt, needs_jit
from helpers.launch import two_ranks
from helpers.toy_training import ToyClassification, scheduled_bert, training_args

KINDS = ("fixed",) + plain_resume.SIGNALS


@pytest.mark.parametrize("kind", KINDS)
def test_plain_loop_resume_is_exact_and_quiet_in_every_order(tmp_path, kind):
    results, _ = plain_resume.check(kind, str(tmp_path))
    assert {order: found for order, found in results.items() if any(found.values())} == {}


@pytest.mark.slow  # 2 processes
def test_plain_loop_resume_is_exact_under_ddp_with_different_data_per_rank(tmp_path):
    out = two_ranks("plain_resume_worker", tmp_path, KINDS, timeout=420)
    for kind in KINDS:
        ranks = [json.load(open(os.path.join(str(out), f"{kind}{rank}.json"))) for rank in (0, 1)]
        assert [r["world"] for r in ranks] == [2, 2], "the loop did not run distributed"
        assert ranks[0]["hash"] == ranks[1]["hash"], f"{kind}: the ranks' final LoRA weights differ"
        assert ranks[0]["data"] != ranks[1]["data"], "both ranks trained on the same batches"
        for rank, found in enumerate(ranks):
            wrong = {order: f for order, f in found["results"].items() if any(f.values())}
            assert wrong == {}, (kind, rank)


def test_weights_loaded_into_a_fresh_model_without_a_scheduler_are_still_checked_at_its_first_forward(tmp_path):
    """The check of loaded weights waits for a resume's LayerScheduler, but not for ever: a model that only
    runs forward (no scheduler, no activate_layers) still hears that trained layers are left out."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, wrapped, optimizer, lr_scheduler = plain_resume.build("fixed")
    run = (model, wrapped, optimizer, lr_scheduler, plain_resume.layer_scheduler(wrapped, optimizer))
    plain_resume.train(run, 0, 7)  # layers 0, 1 and 2 trained
    weights = get_peft_model_state_dict(model)

    fresh = plain_resume.build("fixed")[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_peft_model_state_dict(fresh, weights)
    assert not [w for w in caught if "carry trained LoRA weights" in str(w.message)]
    with pytest.warns(UserWarning, match=r"layer\(s\) \[1, 2\] carry trained LoRA weights"):
        with torch.no_grad():
            fresh(**plain_resume.batch(0))
    with warnings.catch_warnings(record=True) as caught:  # said once
        warnings.simplefilter("always")
        with torch.no_grad():
            fresh(**plain_resume.batch(0))
    assert not [w for w in caught if "carry trained LoRA weights" in str(w.message)]


# ------------------------------------------------------------------ just-in-time (SIGTERM) checkpoint

@needs_jit
@pytest.mark.parametrize("signal_name", ["grad_norm", "update"])
@pytest.mark.parametrize("when", ["before-switch", "after-switch"])
@pytest.mark.slow  # three Trainer runs each
def test_just_in_time_checkpoint_carries_the_current_signal_state(tmp_path, when, signal_name):
    """A SIGTERM at step 6 (a decision time), after a regular checkpoint at step 4: the just-in-time checkpoint
    must carry the signal as measured up to step 6, not as the step-4 save left it; the resumed run then
    decides and trains as the uninterrupted one."""
    spec = {"type": "adaptive", "k": 1, "every": 2, "policy": "top", "explore": 0.0, "signal": signal_name}

    def run(out, resume=None, sigterm=None):
        model = scheduled_bert(spec, unit="step", num_layers=4)
        holder = []
        callbacks = [LayerScheduleCallback()]
        if sigterm is not None:
            callbacks.append(SigtermAt(holder, sigterm, when))
        args = training_args(out, max_steps=10, save_strategy="steps", save_steps=4,
                             enable_jit_checkpoint=sigterm is not None)
        trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(), callbacks=callbacks)
        holder.append(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        run(tmp_path / "first", sigterm=6)
    finally:
        signal.signal(signal.SIGTERM, previous)
    checkpoint = os.path.join(str(tmp_path / "first"), "checkpoint-6")
    assert os.path.isdir(checkpoint), os.listdir(str(tmp_path / "first"))
    resumed = run(tmp_path / "first", resume=checkpoint)
    want, got = straight.peft_config["default"].layer_schedule, resumed.peft_config["default"].layer_schedule
    assert got["decisions"] == want["decisions"]
    assert got["state"] == want["state"]
    assert all(torch.equal(a, b) for a, b in zip(plain_resume.lora(straight).values(),
                                                 plain_resume.lora(resumed).values()))
