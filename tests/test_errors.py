"""Every user mistake gets a ValueError/TypeError that says what was given, what is valid, and the fix."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PretrainedConfig

from peft_layersched import ScheduledLoraConfig, export_lora, schedule_lora

from helpers.scheduled_cases import BY_FAMILY, CASES, lora_params

# (case id, config kwargs, exception type, regex the message must contain): raised by ScheduledLoraConfig(...).
CONFIG_ERRORS = [
    ("empty schedule", {"layer_schedule": {}}, ValueError, r"layer_schedule is empty.*layer_schedule=None"),
    ("negative start", {"layer_schedule": {-1: [1]}}, ValueError, r"start -1 is negative.*epoch/step 0 or later"),
    ("non-int start", {"layer_schedule": {"first": [1]}}, TypeError, r"start 'first' \(str\) is not an int"),
    ("float start", {"layer_schedule": {1.5: [1]}}, TypeError, r"start 1\.5 \(float\) is not an int"),
    ("bool start", {"layer_schedule": {True: [1]}}, TypeError, r"start True is a bool"),
    ("start twice", {"layer_schedule": {0: [1], "0": [2]}}, ValueError, r"start 0 appears twice"),
    (
        "unknown schedule_unit",
        {"layer_schedule": {0: [1]}, "schedule_unit": "epochs"},
        ValueError,
        r"schedule_unit='epochs' is not supported; use one of \['epoch', 'step'\]",
    ),
    (
        "word layer id",
        {"layer_schedule": {0: ["eleven"]}},
        ValueError,
        r"layer_schedule\[0\]: 'eleven' is not a layer id",
    ),
    ("dangling stack", {"layer_schedule": {2: ["decoder."]}}, ValueError, r"layer_schedule\[2\]: 'decoder\.' is not"),
    ("float layer id", {"layer_schedule": {0: [1.0]}}, TypeError, r"layer id 1\.0 has type float"),
    ("layers not a list", {"layer_schedule": {0: 11}}, TypeError, r"layer_schedule\[0\]: expected a list of layer ids"),
    ("layers as a string", {"layer_schedule": {0: "11"}}, TypeError, r"expected a list of layer ids, got '11'"),
    ("schedule not a dict", {"layer_schedule": [11]}, TypeError, r"layer_schedule must be a dict.*got list"),
    ("word in preallocate", {"preallocate_layers": ["eleven"]}, ValueError, r"preallocate_layers: 'eleven' is not"),
    ("preallocate not a list", {"preallocate_layers": 3}, TypeError, r"preallocate_layers: expected a list"),
    ("init_seed not an int", {"layer_schedule": {0: [1]}, "init_seed": "x"}, TypeError, r"init_seed must be an int"),
    (
        "layers_to_transform with a schedule",
        {"layer_schedule": {0: [1]}, "layers_to_transform": [1]},
        ValueError,
        r"layers_to_transform cannot be combined with layer_schedule.*preallocate_layers",
    ),
]


@pytest.mark.parametrize("kwargs,error,message", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors(kwargs, error, message):
    missing = [name for name in kwargs if name not in ScheduledLoraConfig.__dataclass_fields__]
    if missing:
        pytest.skip("LoraConfig of this PEFT has no {} (PEFT 0.3.0)".format(missing))
    with pytest.raises(error, match=message):
        ScheduledLoraConfig(target_modules=["query"], **kwargs)


# (case id, family, config kwargs, exception type, regex): raised by get_peft_model(model, config).
MODEL_ERRORS = [
    (
        "out of range",
        "bert",
        {"layer_schedule": {0: [12]}},
        ValueError,
        r"layer_schedule\[0\]: layer 12 is out of range: stack 'bert\.encoder\.layer' \(bert\.encoder\.layer\) has "
        r"12 layers, valid indices are 0\.\.11 or -12\.\.-1",
    ),
    (
        "negative out of range",
        "gpt2",
        {"layer_schedule": {0: [-5]}},
        ValueError,
        r"layer -5 is out of range.*0\.\.3 or -4\.\.-1",
    ),
    (
        "out of range, later phase",
        "llama",
        {"layer_schedule": {0: [0], 9: [4]}},
        ValueError,
        r"layer_schedule\[9\]: layer 4",
    ),
    (
        "out of range in one stack",
        "t5",
        {"layer_schedule": {0: ["decoder.2"]}},
        ValueError,
        r"layer 'decoder\.2' is out of range: stack 'decoder' \(decoder\.block\) has 2 layers, "
        r"valid indices are 0\.\.1",
    ),
    (
        "preallocate out of range",
        "bert",
        {"preallocate_layers": [20]},
        ValueError,
        r"preallocate_layers: layer 20 is out",
    ),
    (
        "bare int on two stacks",
        "t5",
        {"layer_schedule": {0: [1]}},
        ValueError,
        r"bare layer id 1 is ambiguous: the model has stacks 'encoder' \(encoder\.block, 3 layers\), 'decoder' "
        r"\(decoder\.block, 2 layers\)\. Write '<stack>\.<index>', e\.g\. 'encoder\.1' or 'decoder\.1'",
    ),
    (
        "unknown stack",
        "t5",
        {"layer_schedule": {0: ["middle.0"]}},
        ValueError,
        r"unknown stack 'middle'.*'encoder'.*'decoder'",
    ),
    (
        "stack name on one stack",
        "llama",
        {"layer_schedule": {0: ["decoder.0"]}},
        ValueError,
        r"unknown stack 'decoder'; the model has 4 layers in 'model\.layers' \(ids 0\.\.3, or -4\.\.-1\)",
    ),
    (
        "scheduled layer without target",
        "bert",
        {"target_modules": r".*layer\.(3|4)\.attention\.self\.query", "layer_schedule": {0: [5]}},
        ValueError,
        r"layer\(s\) \[5\] contain no module matching target_modules=.*layers with target modules: \[3, 4\]\. "
        r"Schedule only those layers, or widen target_modules",
    ),
    (
        "stack without target",
        "t5",
        {"target_modules": ["EncDecAttention.q"], "layer_schedule": {0: ["encoder.0"]}},
        ValueError,
        r"layer\(s\) \['encoder\.0'\] contain no module.*layers with target modules: \['decoder\.0', 'decoder\.1'\]",
    ),
    (
        "targets match nothing",
        "bert",
        {"target_modules": ["q_proj"]},
        ValueError,
        r"target_modules=\['q_proj'\] matches no module.*'bert\.encoder\.layer\.0\.attention\.self\.query'",
    ),
    (
        "targets match nothing, Conv1D",
        "gpt2",
        {"target_modules": ["q_proj"]},
        ValueError,
        r"matches no module.*'transformer\.h\.0\.attn\.c_attn'",
    ),
    (
        "targets match nothing, llama",
        "llama",
        {"target_modules": ["query"]},
        ValueError,
        r"'model\.layers\.0\.self_attn\.q_proj'",
    ),
    (
        "regex matches nothing",
        "t5",
        {"target_modules": r"nothing\..*"},
        ValueError,
        r"target_modules='nothing\\\\\..*' matches no",
    ),
    (
        "scheduled layer not preallocated",
        "bert",
        {"layer_schedule": {0: [1], 2: [3]}, "preallocate_layers": [1]},
        ValueError,
        r"layer_schedule uses layer\(s\) \[3\] that preallocate_layers=\[1\] leaves out; "
        r"adapters cannot be added later",
    ),
    (
        "not preallocated, other spelling",
        "t5",
        {"layer_schedule": {0: ["decoder.-1"]}, "preallocate_layers": ["decoder.0"]},
        ValueError,
        r"layer\(s\) \['decoder\.1'\] that preallocate_layers=\['decoder\.0'\] leaves out",
    ),
    (
        "only empty phases",
        "gpt2",
        {"layer_schedule": {0: [], 5: []}},
        ValueError,
        r"names no layer, so no layer would get",
    ),
    (
        "layer_stacks matches nothing",
        "bert",
        {"layer_stacks": "blocks"},
        ValueError,
        r"layer_stacks entry 'blocks' matches no nn\.ModuleList.*'bert\.encoder\.layer'",
    ),
    ("layer_stacks empty", "llama", {"layer_stacks": []}, TypeError, r"layer_stacks must be a non-empty string"),
    (
        "target outside the layers",
        "llama",
        {"target_modules": ["q_proj", "lm_head"]},
        ValueError,
        r"target_modules=.* matches module\(s\) outside the layer stacks \(4 layers in 'model\.layers'.*: "
        r"\['lm_head'\]\. A layer schedule gives LoRA only to modules inside the scheduled layers.*"
        r"modules_to_save=\['lm_head'\]",
    ),
    (
        "suffix also names the pooler",
        "bert",
        {"target_modules": ["query", "dense"]},
        ValueError,
        r"outside the layer stacks .*\['bert\.pooler\.dense'\].*modules_to_save=\['bert\.pooler\.dense'\]",
    ),
    (
        "regex reaches the head",
        "gpt2",
        {"target_modules": r".*(c_attn|lm_head)"},
        ValueError,
        r"outside the layer stacks .*\['lm_head'\]",
    ),
    (
        "cyclic block beyond the candidates",
        "llama",
        {"layer_schedule": {"type": "cyclic", "block": 5}},
        ValueError,
        r"type 'cyclic'\): 'block' is 5 but there are only 4 candidate layers \(\[0, 1, 2, 3\]\).*every layer would "
        r"train at every step; lower 'block' \(at most 4\)",
    ),
]


@pytest.mark.parametrize("family,kwargs,error,message", [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_model_errors(family, kwargs, error, message):
    case = BY_FAMILY[family]
    base = case.base()
    config = dict(target_modules=case.targets, layer_schedule={0: [case.raw_top]})
    config.update(kwargs)
    with pytest.raises(error, match=message):
        get_peft_model(base, ScheduledLoraConfig(**config))
    # Nothing was injected: the user fixes the config and retries on the same model.
    assert not any("lora_" in name for name, _ in base.named_parameters())
    assert lora_params(get_peft_model(base, case.config()))


WRAPPED = ["peft_model", "get_base_model", "plain LoRA"]


@pytest.mark.parametrize("wrap", WRAPPED)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_wrapping_a_wrapped_model_points_to_from_pretrained(case, wrap):
    if wrap == "plain LoRA":
        model = get_peft_model(
            case.base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case.targets)
        )
    else:
        model = case.build()
    again = model if wrap == "peft_model" else model.get_base_model()
    with pytest.raises(ValueError) as raised:
        get_peft_model(again, case.config())
    message = str(raised.value)
    assert "already carries PEFT adapter layers" in message
    assert "PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=True)" in message


# (t given to activate_layers, exception type, regex)
BAD_TIMES = [
    (-1, ValueError, r"t must be >= 0, got -1"),
    (-1.0, ValueError, r"t must be >= 0, got -1"),
    (1.5, TypeError, r"t must be an int .*got 1\.5 \(float\)"),
    ("3", TypeError, r"got '3' \(str\)"),
    (True, TypeError, r"got True \(bool\)"),
    (None, TypeError, r"got None"),
]


@pytest.mark.parametrize("t,error,message", BAD_TIMES, ids=[repr(c[0]) for c in BAD_TIMES])
def test_activate_layers_rejects_bad_times(t, error, message):
    case = BY_FAMILY["llama"]
    model = case.build()
    model.activate_layers(2)
    before = model.active_layers
    with pytest.raises(error, match=message):
        model.activate_layers(t)
    assert model.active_layers == before  # a rejected call changes nothing


def test_export_needs_a_scheduled_model_and_something_to_export(tmp_path):
    case = BY_FAMILY["gpt2"]
    plain = get_peft_model(case.base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case.targets))
    with pytest.raises(TypeError, match=r"export_lora\(\) needs a PeftModel built from a ScheduledLoraConfig"):
        export_lora(plain, str(tmp_path / "a"))
    with pytest.raises(TypeError, match=r"export_lora\(\) needs a PeftModel"):
        export_lora(case.base(), str(tmp_path / "b"))
    scheduled = case.build(layer_schedule={3: [case.raw_top]})
    scheduled.activate_layers(1)  # before the first phase: nothing has trained
    with pytest.raises(ValueError, match=r"nothing to export: no layer of adapter 'default' has been active yet"):
        export_lora(scheduled, str(tmp_path / "c"))


class _Flat(nn.Module):
    """A model with no layer stack: two Linear modules, no nn.ModuleList."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()  # PEFT < 0.4 reads model.config
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Heads(nn.Module):
    """An nn.ModuleList, but of bare Linear heads (no blocks)."""

    def __init__(self):
        super().__init__()
        self.config = PretrainedConfig()
        self.heads = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x):
        return sum(head(x) for head in self.heads)


# (case id, model builder, regex): models without a layer stack, refused by get_peft_model and schedule_lora alike.
NO_STACKS = [
    (
        "no ModuleList",
        _Flat,
        r"cannot schedule layers of _Flat: a layer schedule trains blocks of a layer stack.*it has no nn\.ModuleList"
        r".*use peft\.LoraConfig",
    ),
    (
        "a list of heads",
        _Heads,
        r"cannot schedule layers of _Heads.*its nn\.ModuleLists \(\['heads'\]\) do not hold repeated blocks.*"
        r"layer_stacks='heads'",
    ),
]


@pytest.mark.parametrize("build,message", [c[1:] for c in NO_STACKS], ids=[c[0] for c in NO_STACKS])
def test_a_model_without_layer_stacks_is_refused_with_the_fix(build, message):
    targets = ["up"] if build is _Flat else ["0", "1"]
    base = build()
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, ScheduledLoraConfig(target_modules=targets, layer_schedule={0: [0]}))
    assert not any("lora_" in name for name, _ in base.named_parameters())
    plain = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    with pytest.raises(ValueError, match=message):
        schedule_lora(plain, layer_schedule={0: [0]})
    # Without a schedule the same config is plain LoRA, which needs no layers.
    plain_lora = ScheduledLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    assert get_peft_model(build(), plain_lora).active_adapter == "default"


def test_targets_outside_the_layers_are_refused_alike_by_both_ways_in():
    case = BY_FAMILY["llama"]
    targets = ["q_proj", "lm_head"]
    with pytest.raises(ValueError, match=r"outside the layer stacks"):
        case.build(target_modules=targets)
    plain = get_peft_model(case.base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    assert "lm_head" in [name.split(".lora_")[0].rsplit(".", 1)[-1] for name, _ in lora_params(plain).items()]
    with pytest.raises(ValueError, match=r"outside the layer stacks.*\['lm_head'\]"):
        schedule_lora(plain, layer_schedule={0: [-1]})
    # Named only inside the layers, or the head trained fully: accepted.
    assert lora_params(case.build(target_modules=["q_proj"], modules_to_save=["lm_head"]))
