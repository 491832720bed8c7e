"""Every mistake a user can make gets a ValueError/TypeError that says what is wrong and how to fix it."""

from __future__ import annotations

import pytest
from peft import get_peft_model

from peft_layersched import ScheduledLoraConfig

import tiny_models

# (case id, model family, config kwargs, exception type, regex the message must contain)
CONFIG_ERRORS = [
    ("empty schedule", {"layer_schedule": {}}, ValueError, r"layer_schedule is empty.*layer_schedule=None"),
    ("negative start", {"layer_schedule": {-1: [1]}}, ValueError, r"start -1 is negative"),
    ("non-int start", {"layer_schedule": {"first": [1]}}, TypeError, r"start 'first' \(str\) is not an int"),
    ("float start", {"layer_schedule": {1.5: [1]}}, TypeError, r"start 1.5 \(float\) is not an int"),
    ("bool start", {"layer_schedule": {True: [1]}}, TypeError, r"is a bool"),
    ("unknown unit", {"layer_schedule": {0: [1]}, "schedule_unit": "epochs"}, ValueError, r"'epochs'.*'epoch', 'step'"),
    ("word layer id", {"layer_schedule": {0: ["eleven"]}}, ValueError, r"'eleven' is not a layer id"),
    ("float layer id", {"layer_schedule": {0: [1.0]}}, TypeError, r"layer id 1.0 has type float"),
    ("layers not a list", {"layer_schedule": {0: 11}}, TypeError, r"expected a list of layer ids"),
    ("schedule not a dict", {"layer_schedule": [11]}, TypeError, r"must be a dict"),
    ("bad init_seed", {"layer_schedule": {0: [1]}, "init_seed": "x"}, TypeError, r"init_seed must be an int"),
]


@pytest.mark.parametrize("kwargs,error,message", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        ScheduledLoraConfig(target_modules=["query"], **kwargs)


MODEL_ERRORS = [
    (
        "out of range",
        "bert",
        {"target_modules": ["query"], "layer_schedule": {0: [12]}},
        r"layer 12 is out of range.*12 layers, valid indices are 0\.\.11 or -12\.\.-1",
    ),
    (
        "negative out of range",
        "bert",
        {"target_modules": ["query"], "layer_schedule": {0: [-13]}},
        r"layer -13 is out of range",
    ),
    (
        "bare int on two stacks",
        "t5",
        {"target_modules": ["q"], "layer_schedule": {0: [1]}},
        r"bare layer id 1 is ambiguous.*'encoder' \(encoder.block, 3 layers\).*'decoder.1'",
    ),
    (
        "unknown stack",
        "t5",
        {"target_modules": ["q"], "layer_schedule": {0: ["middle.0"]}},
        r"unknown stack 'middle'.*'encoder'.*'decoder'",
    ),
    (
        "layer without target",
        "bert",
        {"target_modules": r".*layer\.(3|4)\.attention\.self\.query", "layer_schedule": {0: [5]}},
        r"layer\(s\) \[5\] contain no module matching.*layers with target modules: \[3, 4\]",
    ),
    (
        "targets match nothing",
        "bert",
        {"target_modules": ["q_proj"], "layer_schedule": {0: [1]}},
        r"matches no module of the model.*bert\.encoder\.layer\.0\.attention\.self\.query",
    ),
    (
        "scheduled layer not preallocated",
        "bert",
        {"target_modules": ["query"], "layer_schedule": {0: [1], 2: [3]}, "preallocate_layers": [1]},
        r"layer_schedule uses layer\(s\) \[3\] that preallocate_layers=\[1\] leaves out",
    ),
    (
        "only empty phases",
        "bert",
        {"target_modules": ["query"], "layer_schedule": {0: []}},
        r"names no layer, so no layer would get a LoRA adapter",
    ),
    (
        "layers_pattern matches nothing",
        "bert",
        {"target_modules": ["query"], "layer_schedule": {0: [1]}, "layers_pattern": "blocks"},
        r"layers_pattern entry 'blocks' matches no nn.ModuleList.*bert.encoder.layer",
    ),
]


@pytest.mark.parametrize("family,kwargs,message", [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_model_errors(family, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_models.BUILDERS[family](), ScheduledLoraConfig(**kwargs))


@pytest.mark.parametrize("wrap", ["peft_model", "get_base_model"])
def test_wrapping_a_wrapped_model_points_to_from_pretrained(wrap):
    config = ScheduledLoraConfig(target_modules=["query", "value"], layer_schedule={0: [1]}, lora_dropout=0.1)
    model = get_peft_model(tiny_models.bert(), config)
    again = model if wrap == "peft_model" else model.get_base_model()
    second = ScheduledLoraConfig(target_modules=["query", "value"], layer_schedule={0: [2]}, lora_dropout=0.1)
    with pytest.raises(ValueError, match=r"already carries PEFT adapter layers.*from_pretrained\(.*is_trainable=True"):
        get_peft_model(again, second)


def test_activate_layers_rejects_bad_times():
    model = get_peft_model(tiny_models.bert(), ScheduledLoraConfig(target_modules=["query"], layer_schedule={0: [1]}))
    with pytest.raises(ValueError, match=r"t must be >= 0"):
        model.activate_layers(-1)
    with pytest.raises(TypeError, match=r"t must be an int"):
        model.activate_layers("3")
