"""Layer discovery and addressing on real tiny models: stacks, ids, regex / all-linear targets, layers_pattern."""

from __future__ import annotations

import pytest

from peft_layersched.layers import LayerIndex, discover_stacks

from helpers.scheduled_cases import BY_FAMILY, CASES, lora_modules, lora_params


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_stacks_are_discovered(case):
    stacks = discover_stacks(case.base())
    assert [(s.name, s.path, s.length) for s in stacks] == case.stacks


# (family, layer id as the user writes it, canonical id)
LAYER_IDS = [
    ("bert", 0, 0),
    ("bert", 1, 1),
    ("bert", 10, 10),
    ("bert", -1, 11),
    ("bert", -12, 0),
    ("bert", "11", 11),
    ("bert", "bert.encoder.layer.-2", 10),
    ("gpt2", -4, 0),
    ("gpt2", "transformer.h.-1", 3),
    ("llama", -1, 3),
    ("llama", "model.layers.2", 2),
    ("t5", "decoder.-1", "decoder.1"),
    ("t5", "encoder.-3", "encoder.0"),
    ("t5", "encoder.2", "encoder.2"),
    ("t5", "decoder.block.0", "decoder.0"),
    ("t5", "encoder.block.-1", "encoder.2"),
]


@pytest.mark.parametrize("family,raw,canonical", LAYER_IDS)
def test_layer_ids_address_exactly_their_layer(family, raw, canonical):
    case = BY_FAMILY[family]
    model = case.build(layer_schedule={0: [raw]})
    expected = case.target_names([canonical])
    assert expected  # the case table is meaningful: the layer holds targets
    assert lora_modules(model) == expected
    assert model.scheduled_modules() == {name: canonical for name in expected}
    assert model.preallocated_layers == [canonical]
    assert model.activate_layers(0) == [canonical]
    assert model.ever_active_layers == [canonical]


def test_layer_one_is_never_confused_with_layers_ten_and_eleven():
    case = BY_FAMILY["bert"]
    model = case.build(layer_schedule={0: [1]}, preallocate_layers=[1, 10, 11])
    assert lora_modules(model) == [
        "bert.encoder.layer.{}.attention.self.{}".format(layer, kind)
        for layer in (1, 10, 11)
        for kind in ("query", "value")
    ]
    model.activate_layers(0)
    grads = {name: param.requires_grad for name, param in lora_params(model).items()}
    assert {name for name, train in grads.items() if train} == {n for n in grads if ".layer.1." in n}
    assert len([n for n in grads if ".layer.1." in n]) == 4  # A and B of query and value

    index = LayerIndex.from_model(case.base())
    assert index.layer_of("bert.encoder.layer.1.attention.self.query") == 1
    assert index.layer_of("bert.encoder.layer.10.attention.self.query") == 10
    assert index.layer_of("bert.encoder.layer.11") == 11
    assert index.layer_of("bert.pooler.dense") is None
    assert index.layer_of("classifier") is None


# (case id, family, target_modules, schedule, t -> expected active layers, expected LoRA module names)
TARGET_CASES = [
    (
        "regex over layers 3-5",
        "bert",
        r".*encoder\.layer\.(3|4|5)\.attention\.self\.(query|value)",
        {0: [5], 2: [4, 5], 4: [3, 4, 5]},
        {0: [5], 3: [4, 5], 9: [3, 4, 5]},
        ["bert.encoder.layer.{}.attention.self.{}".format(i, k) for i in (3, 4, 5) for k in ("query", "value")],
    ),
    (
        "regex wider than the schedule",
        "bert",
        r".*\.attention\.self\.(query|value)",
        {0: [3], 1: [4]},
        {0: [3], 1: [4]},
        ["bert.encoder.layer.{}.attention.self.{}".format(i, k) for i in (3, 4) for k in ("query", "value")],
    ),
    (
        "all-linear on Conv1D",
        "gpt2",
        "all-linear",
        {0: [-1]},
        {0: [3]},
        [
            "transformer.h.3.attn.c_attn",
            "transformer.h.3.attn.c_proj",
            "transformer.h.3.mlp.c_fc",
            "transformer.h.3.mlp.c_proj",
        ],
    ),
    (
        "all-linear",
        "llama",
        "all-linear",
        {0: [0]},
        {0: [0]},
        ["model.layers.0.mlp.{}_proj".format(k) for k in ("down", "gate", "up")]
        + ["model.layers.0.self_attn.{}_proj".format(k) for k in ("k", "o", "q", "v")],
    ),
    (
        "regex, decoder only",
        "t5",
        r".*\.EncDecAttention\.(q|v)",
        {0: ["decoder.0"], 1: ["decoder.-1"]},
        {0: ["decoder.0"], 1: ["decoder.1"]},
        ["decoder.block.{}.layer.1.EncDecAttention.{}".format(i, k) for i in (0, 1) for k in ("q", "v")],
    ),
    (
        "dotted suffix list",
        "t5",
        ["SelfAttention.q"],
        {0: ["encoder.0", "decoder.0"]},
        {0: ["encoder.0", "decoder.0"]},
        ["decoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.q"],
    ),
]


@pytest.mark.parametrize(
    "family,targets,schedule,active,expected", [c[1:] for c in TARGET_CASES], ids=[c[0] for c in TARGET_CASES]
)
def test_target_modules_forms(family, targets, schedule, active, expected):
    case = BY_FAMILY[family]
    model = case.build(target_modules=targets, layer_schedule=schedule)
    assert lora_modules(model) == sorted(expected)
    for t, layers in sorted(active.items()):
        assert model.activate_layers(t) == layers
    kept = model.peft_config["default"].target_modules
    assert (kept == targets) if isinstance(targets, str) else (set(kept) == set(targets))  # the user's value


# (case id, family, layers_pattern, stacks found as (name, path, length), schedule, preallocated, their blocks)
PATTERNS = [
    (
        "suffix",
        "bert",
        "layer",
        [("bert.encoder.layer", "bert.encoder.layer", 12)],
        {0: [-1]},
        [11],
        ["bert.encoder.layer.11."],
    ),
    ("one-segment suffix", "gpt2", "h", [("transformer.h", "transformer.h", 4)], {0: [0]}, [0], ["transformer.h.0."]),
    ("full path", "llama", "model.layers", [("model.layers", "model.layers", 4)], {0: [-1]}, [3], ["model.layers.3."]),
    (
        "one of two stacks",
        "t5",
        "decoder.block",
        [("decoder.block", "decoder.block", 2)],
        {0: [-1]},
        [1],
        ["decoder.block.1."],
    ),
    (
        "both stacks, listed",
        "t5",
        ["encoder.block", "decoder.block"],
        [("encoder", "encoder.block", 3), ("decoder", "decoder.block", 2)],
        {0: ["decoder.-1"], 1: ["encoder.2"]},
        ["encoder.2", "decoder.1"],
        ["encoder.block.2.", "decoder.block.1."],
    ),
]


@pytest.mark.parametrize(
    "family,pattern,stacks,schedule,preallocated,blocks", [c[1:] for c in PATTERNS], ids=[c[0] for c in PATTERNS]
)
def test_layers_pattern_overrides_discovery(family, pattern, stacks, schedule, preallocated, blocks):
    case = BY_FAMILY[family]
    assert [(s.name, s.path, s.length) for s in discover_stacks(case.base(), pattern)] == stacks
    model = case.build(layer_stacks=pattern, layer_schedule=schedule)
    assert model.preallocated_layers == preallocated
    expected = case.modules_under(blocks)
    assert expected and lora_modules(model) == expected
    assert model.peft_config["default"].layer_stacks == pattern  # kept for save / from_pretrained
