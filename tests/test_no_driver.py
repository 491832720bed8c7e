"""Training with no layer-schedule driver, as a user does it by mistake: a hand-written loop without
``LayerScheduler``, a ``Trainer`` whose ``LayerScheduleCallback`` was forgotten.  The layers that train are
recorded as ever active (so saving, loading and ``export_lora`` keep them), one warning says what is missing, and
a driven run never hears it.  Adaptive schedules cannot be driven by ``activate_layers`` alone: it refuses a time
its decision log does not cover, and a driven run saves and reloads every layer it trained."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import Trainer

from peft_layersched import LayerScheduleCallback, LayerScheduler, export_lora

from helpers.scheduled_cases import BY_FAMILY, lora_params
from helpers.toy_training import ToyClassification, scheduled_bert, training_args

CASE = BY_FAMILY["llama"]
NO_DRIVER = "no layer-schedule driver"
LEFT_OUT = "left out of the forward"


def batches(n=4):
    return [CASE.inputs(seed=seed) for seed in range(n)]


def plain_loop(model, driver=None, steps=4):
    """The docs' plain loop: optimizer over what requires grad right after get_peft_model, then train."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = LayerScheduler(model, optimizer, total_steps=steps) if driver == "LayerScheduler" else None
    if driver == "activate_layers":
        model.activate_layers(0)
    for batch in batches(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        if sched is not None:
            sched.step()
        optimizer.zero_grad(set_to_none=True)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(**CASE.inputs(seed=99)).logits


def trained_layers(model):
    """Layers whose lora_B is not zero (they received updates)."""
    return sorted({CASE.layer_of(name) for name, p in lora_params(model).items() if "lora_B" in name and p.any()})


def messages(caught, words):
    return [str(w.message) for w in caught if words in str(w.message)]


def test_a_plain_loop_without_a_driver_records_what_trained_and_says_so_once(tmp_path):
    model = CASE.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits(model)  # an evaluation (no grad) trains nothing
        assert model.ever_active_layers == []
        plain_loop(model)
    said = messages(caught, NO_DRIVER)
    assert len(said) == 1, said
    assert "layer(s) [3]" in said[0] and "LayerScheduleCallback()" in said[0] and "LayerScheduler(" in said[0]
    assert trained_layers(model) == [CASE.top]
    assert model.ever_active_layers == [CASE.top]
    assert model.peft_config["default"].ever_active_layers == [CASE.top]  # what save_pretrained writes

    expected = logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(CASE.base(), str(tmp_path / "adapter"))
    assert not messages(caught, LEFT_OUT)
    assert torch.equal(logits(loaded), expected)

    export_lora(model, str(tmp_path / "export"))  # (refused before: "no layer ... has been active yet")
    vanilla = PeftModel.from_pretrained(CASE.base(), str(tmp_path / "export"))
    assert torch.allclose(logits(vanilla), expected, atol=1e-6)


def test_a_trainer_without_the_callback_records_what_trained_and_says_so_once(tmp_path):
    model = scheduled_bert({0: [-1], 2: [-2, -1]}, num_layers=4, dropout=0.0)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", num_train_epochs=2),
                      train_dataset=ToyClassification())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = messages(caught, NO_DRIVER)
    assert len(said) == 1, said
    assert model.ever_active_layers == [3]
    assert sorted({int(n.split(".layer.")[1].split(".")[0]) for n, p in lora_params(model).items()
                   if "lora_B" in n and p.any()}) == [3]

    trainer.save_model(str(tmp_path / "saved"))
    model.eval()
    batch = ToyClassification(n=4, seed=5)[:]
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from helpers import tiny_models

        loaded = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), str(tmp_path / "saved"))
    assert not messages(caught, LEFT_OUT)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch["input_ids"]).logits, expected)


@pytest.mark.parametrize("driver", ["LayerScheduler", "activate_layers"])
def test_a_driven_plain_loop_hears_nothing(driver):
    model = CASE.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain_loop(model, driver)
    assert not messages(caught, NO_DRIVER)
    assert model.ever_active_layers == trained_layers(model)


def test_a_trainer_with_the_callback_hears_nothing(tmp_path):
    model = scheduled_bert({0: [-1], 1: [-2, -1]}, num_layers=4, dropout=0.0)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", num_train_epochs=2),
                      train_dataset=ToyClassification(), callbacks=[LayerScheduleCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not messages(caught, NO_DRIVER)
    assert model.ever_active_layers == [2, 3]


# ----------------------------------------------------------------------------------- adaptive schedules

ADAPTIVE = [
    # (id, layer_schedule, the first time activate_layers alone refuses)
    ("adaptive", {"type": "adaptive", "k": 1, "every": 2, "policy": "sample", "explore": 0.3, "seed": 1}, 0),
    ("autofreeze", {"type": "autofreeze", "every": 2, "percentile": 60}, 2),
]


@pytest.mark.parametrize("spec,first_refused", [c[1:] for c in ADAPTIVE], ids=[c[0] for c in ADAPTIVE])
def test_activate_layers_alone_refuses_an_adaptive_time_it_cannot_decide(spec, first_refused):
    model = CASE.build(layer_schedule=spec, schedule_unit="step")
    for t in range(first_refused):
        model.activate_layers(t)  # autofreeze: every candidate trains until its first decision
    with pytest.raises(ValueError, match=r"activate_layers\({0}\): the {1} schedule has no decision for step {0} "
                                         r"\(its decision log is empty\).*LayerScheduleCallback.*LayerScheduler"
                                         .format(first_refused, spec["type"])):
        model.activate_layers(first_refused)
    assert model.base_model.scheduled_adapter().time == (first_refused - 1 if first_refused else None)  # unmoved


@pytest.mark.parametrize("spec,first_refused", [c[1:] for c in ADAPTIVE], ids=[c[0] for c in ADAPTIVE])
def test_a_driven_adaptive_run_saves_and_reloads_every_layer_it_trained(tmp_path, spec, first_refused):
    model = CASE.build(layer_schedule=spec, schedule_unit="step")
    steps = 8
    plain_loop(model, "LayerScheduler", steps=steps)
    decisions = model.peft_config["default"].layer_schedule["decisions"]
    assert decisions
    assert model.ever_active_layers == trained_layers(model)
    expected = logits(model)
    model.save_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(CASE.base(), str(tmp_path / "adapter"), is_trainable=True)
    assert not messages(caught, LEFT_OUT)
    assert torch.equal(logits(loaded), expected)
    # The logged decisions replay; past the log the next decision is owed, so activate_layers refuses.
    last = decisions[-1]["t"]
    schedule = loaded.base_model.scheduled_adapter().schedule
    assert [loaded.activate_layers(t) for t in range(last + 1)] == [schedule.active_at(t) for t in range(last + 1)]
    with pytest.raises(ValueError, match=r"has no decision for step {}".format(last + 2)):
        loaded.activate_layers(last + 2)
