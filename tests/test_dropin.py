"""Drop-in integrity: a ``ScheduledLoraConfig`` behaves as a ``LoraConfig`` through PEFT's lifecycle, and
every PEFT entry point keeps the schedule state consistent (real tiny models, real Trainer runs)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import warnings

import numpy
import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraModel
from transformers import Trainer, TrainingArguments

from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig

from helpers import tiny_models
from helpers.toy_training import ToyClassification, training_args

PEFT = Version(Version(peft.__version__).base_version)
TOP = 11


def needs_peft(version, what):
    return pytest.mark.skipif(PEFT < Version(version), reason=f"PEFT {peft.__version__} has no {what} (>= {version})")


def config(**kwargs):
    base = dict(r=4, target_modules=["query", "value"], layer_schedule={0: [TOP], 2: [9, TOP]}, task_type="SEQ_CLS",
                init_seed=0)
    base.update(kwargs)
    return ScheduledLoraConfig(**base)


def plain_lora(**kwargs):
    # lora_alpha / lora_dropout: PEFT 0.3.0's LoraConfig defaults are None, which it crashes on.
    return LoraConfig(lora_alpha=8, lora_dropout=0.0, **kwargs)


def eval_each_epoch():
    fields = TrainingArguments.__dataclass_fields__
    return {"eval_strategy" if "eval_strategy" in fields else "evaluation_strategy": "epoch"}


def logits(model, seed=123):
    ids = torch.randint(1, 99, (2, 8), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora(model, layer, adapter="default", part="lora_B"):
    return [p for n, p in model.named_parameters() if f"layer.{layer}." in n and f"{part}.{adapter}" in n]


def package_hooks(model):
    found = []
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for hook in hooks.values():
                if type(hook).__module__.startswith("peft_layersched"):
                    found.append(hook)
    return found


# ------------------------------------------------------------------------------------ config reuse


def test_one_config_builds_the_same_scheduled_model_every_time_and_is_not_written_to():
    cfg = config()
    plain = plain_lora(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    before, plain_before = cfg.to_dict(), plain.to_dict()
    models = [get_peft_model(tiny_models.bert(), cfg) for _ in range(3)]
    get_peft_model(tiny_models.bert(), plain)
    # Only the keys vanilla PEFT itself writes into a LoraConfig may change.
    vanilla_writes = {k for k in plain_before if plain.to_dict()[k] != plain_before[k]}
    assert {k for k in before if cfg.to_dict()[k] != before[k]} <= vanilla_writes
    for key in ("peft_type", "init_seed", "ever_active_layers", "schedule_position", "target_modules"):
        assert cfg.to_dict()[key] == before[key], key
    for model in models:
        assert type(model.base_model).__name__ == "ScheduledLoraModel"
        assert model.preallocated_layers == [9, TOP] and model.active_layers == [TOP]
        assert model.peft_config["default"] is not cfg
    assert torch.equal(logits(models[0]), logits(models[2]))
    models[0].activate_layers(2)
    assert models[0].ever_active_layers == [9, TOP] and models[1].ever_active_layers == []
    assert cfg.ever_active_layers is None


def test_model_init_reruns_give_the_same_scheduled_trainer(tmp_path):
    cfg = config(layer_schedule={0: [TOP], 1: [10]})
    trainers = [
        Trainer(model_init=lambda: get_peft_model(tiny_models.bert(), cfg), args=training_args(tmp_path / str(i),
                num_train_epochs=2), train_dataset=ToyClassification(), callbacks=[LayerScheduleCallback()])
        for i in range(2)
    ]
    for trainer in trainers:
        trainer.train()
        assert trainer.model.ever_active_layers == [10, TOP]
    assert cfg.ever_active_layers is None and cfg.schedule_position is None


# ------------------------------------------------------------------------------------ adapters


# PEFT 0.3-0.5 mark every adapter trainable on add_adapter and keep one disable flag per layer.
SEVERAL_ADAPTERS = needs_peft("0.6", "per-layer active adapters (several adapters with their own state)")
# Several adapters: no task_type (PEFT 0.5-0.7 give a second SEQ_CLS adapter no classifier of its own,
# with LoraConfig too).


@SEVERAL_ADAPTERS
def test_same_config_object_as_a_second_adapter_is_scheduled_and_frozen_until_set_adapter():
    cfg = config(task_type=None)
    model = get_peft_model(tiny_models.bert(), cfg)
    model.add_adapter("second", cfg)
    assert model.peft_config["second"] is not cfg
    assert not any(p.requires_grad for p in lora(model, TOP, "second") + lora(model, 9, "second"))
    assert all(p.requires_grad for p in lora(model, TOP))
    model.set_adapter("second")
    model.activate_layers(0, "second")
    assert all(p.requires_grad for p in lora(model, TOP, "second"))
    assert not any(p.requires_grad for p in lora(model, 9, "second") + lora(model, TOP, "default"))


@SEVERAL_ADAPTERS
def test_plain_lora_adapter_mixes_with_a_scheduled_one():
    model = get_peft_model(tiny_models.bert(), config(task_type=None))
    model.add_adapter("plain", plain_lora(r=2, target_modules=["query"]))
    assert not any(p.requires_grad for p in lora(model, 0, "plain"))
    model.set_adapter("plain")
    assert all(p.requires_grad for p in lora(model, 0, "plain"))
    assert not any(p.requires_grad for p in lora(model, TOP))
    model.set_adapter("default")
    assert model.active_layers == [TOP] and all(p.requires_grad for p in lora(model, TOP))
    if hasattr(model, "delete_adapter"):
        model.delete_adapter("plain")
    assert model.activate_layers(2) == [9, TOP]


@SEVERAL_ADAPTERS
def test_delete_scheduled_adapter_leaves_a_working_plain_one():
    model = get_peft_model(tiny_models.bert(), config(task_type=None))
    model.add_adapter("plain", plain_lora(r=2, target_modules=["query"]))
    model.set_adapter("plain")
    model.delete_adapter("default")
    assert package_hooks(model) == []
    assert all(p.requires_grad for p in lora(model, 0, "plain"))
    logits(model)


def trained_and_saved(folder, **kwargs):
    """A scheduled model whose layers 9 and 11 both trained (non-zero lora_B), saved to ``folder``."""
    model = get_peft_model(tiny_models.bert(), config(**kwargs))
    model.activate_layers(2)
    with torch.no_grad():
        for p in lora(model, 9) + lora(model, TOP):
            p.add_(0.05)
    model.save_pretrained(str(folder))
    return model


@SEVERAL_ADAPTERS
def test_load_adapter_of_a_scheduled_adapter_as_second_adapter(tmp_path):
    model = trained_and_saved(tmp_path, task_type=None)
    other = get_peft_model(tiny_models.bert(), config(layer_schedule={0: [5]}, task_type=None))
    other.load_adapter(str(tmp_path), adapter_name="loaded")
    other.set_adapter("loaded")
    assert other.base_model.scheduled_modules("loaded")
    assert torch.allclose(logits(other), logits(model), atol=1e-6)


# ------------------------------------------------------------------------- disable / merge / unload


def test_disable_adapter_gives_base_output_without_a_mixed_state_warning():
    base_logits = logits(tiny_models.bert())
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=False))
    scheduled = logits(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with model.disable_adapter():
            assert torch.allclose(logits(model), base_logits, atol=1e-6)
    assert not [w for w in caught if "enabled and others" in str(w.message)]
    assert torch.equal(logits(model), scheduled)
    assert model.active_layers == [TOP] and all(p.requires_grad for p in lora(model, TOP))


@needs_peft("0.6", "per-layer active adapters")
def test_merge_adapter_merges_only_adapters_that_ran():
    # init_lora_weights=False: the never-active layer 9 has a non-zero delta that must not be merged.
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=False))
    before = logits(model)
    model.merge_adapter()
    assert torch.allclose(logits(model), before, atol=1e-5)
    model.unmerge_adapter()
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_merge_and_unload_and_unload_leave_no_package_hooks():
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=False))
    assert package_hooks(model)  # the backward stop below the lowest active layer
    before = logits(model)
    merged = model.merge_and_unload()
    assert package_hooks(merged) == []
    assert torch.allclose(logits(merged), before, atol=1e-5)
    scheduled = get_peft_model(tiny_models.bert(), config())
    if hasattr(LoraModel, "unload"):  # PEFT >= 0.5
        assert package_hooks(scheduled.unload()) == []


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@needs_peft("0.11", "PiSSA/OLoRA init")
def test_base_weight_moving_inits_keep_the_output_until_training(init):
    base_logits = logits(tiny_models.bert())
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=init, init_seed=None))
    assert torch.allclose(logits(model), base_logits, rtol=1e-4, atol=1e-5)
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged), base_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
def test_zero_delta_inits_keep_the_output_until_training(init):
    from peft.tuners.lora import LoraConfig as PeftLoraConfig

    if init not in str(PeftLoraConfig.__dataclass_fields__["init_lora_weights"].type) + str(
        PeftLoraConfig.__dataclass_fields__["init_lora_weights"].metadata
    ):
        pytest.skip(f"PEFT {peft.__version__} has no init_lora_weights={init!r}")
    base_logits = logits(tiny_models.bert())
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=init, init_seed=None))
    assert torch.allclose(logits(model), base_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["eva", "corda", "loftq", "lora_ga"])
def test_data_driven_inits_are_refused_with_a_schedule(init):
    with pytest.raises(ValueError, match=f"init_lora_weights='{init}' cannot be combined with a layer schedule"):
        config(init_lora_weights=init)


@needs_peft("0.17", "target_parameters")
def test_target_parameters_with_a_schedule_is_refused():
    with pytest.raises(ValueError, match="target_parameters cannot be combined with a layer schedule"):
        config(target_parameters=["attention.self.query.weight"])


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_base_weight_keeping_inits_leave_never_active_layers_out(init):
    model = get_peft_model(tiny_models.bert(), config(init_lora_weights=init))
    assert model.base_model.scheduled_modules()
    base_logits = logits(tiny_models.bert())
    with torch.no_grad():
        for p in lora(model, 9, part="lora_"):
            p.add_(1.0)
    out = logits(model)
    if init is not False:
        assert torch.allclose(out, base_logits, atol=1e-6)  # layer 11 starts at zero, layer 9 is left out


# ------------------------------------------------------------------------------ PEFT config fields


@needs_peft("0.14", "exclude_modules")
def test_exclude_modules_that_empty_a_scheduled_layer_is_refused():
    with pytest.raises(ValueError, match=r"exclude_modules.*layer\(s\) \[9\]"):
        get_peft_model(tiny_models.bert(), config(exclude_modules=r".*layer\.9\..*"))
    model = get_peft_model(tiny_models.bert(), config(exclude_modules=r".*layer\.9\.attention\.self\.query"))
    assert sorted(n for n in model.base_model.scheduled_modules() if ".9." in n) == [
        "bert.encoder.layer.9.attention.self.value"]


@pytest.mark.skipif("rank_pattern" not in {f.name for f in dataclasses.fields(LoraConfig)},
                    reason=f"PEFT {peft.__version__} has no rank_pattern")
def test_rank_pattern_is_honoured_on_scheduled_layers():
    model = get_peft_model(tiny_models.bert(), config(rank_pattern={r".*\.11\.attention\.self\.query": 2}))
    shapes = {n: p.shape for n, p in model.named_parameters() if "lora_A.default" in n}
    assert shapes["base_model.model.bert.encoder.layer.11.attention.self.query.lora_A.default.weight"][0] == 2
    assert shapes["base_model.model.bert.encoder.layer.11.attention.self.value.lora_A.default.weight"][0] == 4


@needs_peft("0.9", "DoRA")
def test_dora_magnitudes_follow_the_schedule():
    model = get_peft_model(tiny_models.bert(), config(use_dora=True))
    model.activate_layers(0)
    assert all(p.requires_grad for p in lora(model, TOP, part="lora_magnitude_vector"))
    assert not any(p.requires_grad for p in lora(model, 9, part="lora_magnitude_vector"))


# ------------------------------------------------------------------------------ Trainer lifecycle


def test_load_best_model_at_end_restores_the_best_checkpoints_schedule_state(tmp_path):
    model = get_peft_model(tiny_models.bert(), config(layer_schedule={0: [TOP], 1: [10], 2: [9]}))
    calls = []

    def first_is_best(_):
        calls.append(1)
        return {"score": -float(len(calls))}

    args = training_args(tmp_path, num_train_epochs=3, save_strategy="epoch", **eval_each_epoch(),
                         load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=ToyClassification(), eval_dataset=ToyClassification(n=4),
                      compute_metrics=first_is_best, callbacks=[LayerScheduleCallback()])
    trainer.train()
    positions = []
    for folder in sorted(os.listdir(str(tmp_path)), key=lambda f: int(f.split("-")[-1])):
        with open(os.path.join(str(tmp_path), folder, "adapter_config.json")) as handle:
            saved = json.load(handle)
        positions.append((saved["schedule_position"], saved["ever_active_layers"]))
    assert positions == [(0, [TOP]), (1, [10, TOP]), (2, [9, 10, TOP])]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert model.active_layers == [TOP] and model.ever_active_layers == [TOP]
    assert model.peft_config["default"].schedule_position == 0
    assert not any(p.requires_grad for p in lora(model, 10))


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A first stage (2 epochs of {0: [11], 1: [10], 2: [9], 3: [8]}) saved once; read by the second stages."""
    folder = tmp_path_factory.mktemp("stage-one")
    model = get_peft_model(tiny_models.bert(), config(layer_schedule={0: [TOP], 1: [10], 2: [9], 3: [8]}))
    Trainer(model=model, args=training_args(folder / "one", num_train_epochs=2), train_dataset=ToyClassification(),
            callbacks=[LayerScheduleCallback()]).train()
    model.save_pretrained(str(folder / "adapter"))
    return str(folder / "adapter")


@pytest.mark.parametrize("start, expected", [("restart", [10]), ("continue", [8])])
def test_second_stage_restarts_or_continues_by_explicit_choice(tmp_path, caplog, stage_one, start, expected):
    model = PeftModel.from_pretrained(tiny_models.bert(), stage_one, is_trainable=True)
    assert model.peft_config["default"].schedule_position == 1
    callback = LayerScheduleCallback(schedule_start=start) if start == "continue" else LayerScheduleCallback()
    with caplog.at_level(logging.WARNING, logger="peft_layersched"):
        Trainer(model=model, args=training_args(tmp_path / "two", num_train_epochs=2),
                train_dataset=ToyClassification(), callbacks=[callback]).train()
    assert model.active_layers == expected
    message = "schedule_start='continue'" if start == "continue" else "starts it again at epoch 0"
    assert any(message in record.getMessage() for record in caplog.records)


# ----------------------------------------------------------------------------------------- loading


def test_loading_weights_that_the_saved_schedule_hides_warns_with_the_layers(tmp_path):
    trained_and_saved(tmp_path)
    path = os.path.join(str(tmp_path), "adapter_config.json")
    with open(path) as handle:
        saved = json.load(handle)
    saved["ever_active_layers"], saved["layer_schedule"] = [TOP], {"0": [TOP], "5": [9, TOP]}
    with open(path, "w") as handle:
        json.dump(saved, handle)
    with pytest.warns(UserWarning, match=r"layer\(s\) \[9\] carry trained LoRA weights"):
        PeftModel.from_pretrained(tiny_models.bert(), str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        saved["ever_active_layers"] = [9, TOP]
        with open(path, "w") as handle:
            json.dump(saved, handle)
        try:
            PeftModel.from_pretrained(tiny_models.bert(), str(tmp_path))
        except UserWarning as exc:  # other libraries' warnings are not ours to judge
            assert "carry trained LoRA weights" not in str(exc)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kwargs, error, match", [
    ({"layer_stacks": 5}, TypeError, "layer_stacks must be a str"),
    ({"target_modules": r".*(query"}, ValueError, "not a valid regular expression"),
    ({"schedule_position": -1}, ValueError, "schedule_position must be >= 0"),
])
def test_bad_config_fields_fail_at_build(kwargs, error, match):
    with pytest.raises(error, match=match):
        config(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"new_layer_lr_scale": float("inf")}, ValueError, "finite"),
    ({"new_layer_lr_scale": float("nan")}, ValueError, "finite"),
    ({"warn_on_no_update": "no"}, TypeError, "True or False"),
    ({"schedule_start": "resume"}, ValueError, "schedule_start"),
])
def test_bad_callback_options_fail_at_build(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerScheduleCallback(**kwargs)


@pytest.mark.parametrize("t", [numpy.int64(2), numpy.int32(2), torch.tensor(2), 2.0])
def test_integer_like_times_are_accepted(t):
    model = get_peft_model(tiny_models.bert(), config())
    assert model.activate_layers(t) == [9, TOP]
    assert type(model.peft_config["default"].schedule_position) is int


@pytest.mark.parametrize("t", [torch.tensor(2.5), numpy.float64(2.5), "2"])
def test_non_integer_times_are_refused(t):
    model = get_peft_model(tiny_models.bert(), config())
    with pytest.raises(TypeError, match="must be an int"):
        model.activate_layers(t)


def test_deepcopy_of_a_scheduled_model_stays_scheduled():
    model = get_peft_model(tiny_models.bert(), config())
    clone = copy.deepcopy(model)
    assert type(clone.base_model).__name__ == "ScheduledLoraModel"
    assert clone.activate_layers(2) == [9, TOP]
    assert model.active_layers == [TOP]
