"""The scheduled LoRA tuner on real tiny models: placement, activation, invisibility, save/load, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peft_layersched import ScheduledLoraConfig, export_lora
from peft_layersched.layers import discover_stacks

import tiny_models

# family -> (stacks as (name, path, length), schedule, expected active ids at t=0 and t=2, preallocated)
CASES = {
    "bert": (
        [("bert.encoder.layer", 12)],
        {0: [-1], 2: [1, -1]},
        ([11], [1, 11]),
    ),
    "gpt2": (
        [("transformer.h", 4)],
        {0: [3], 2: [0, 3]},
        ([3], [0, 3]),
    ),
    "llama": (
        [("model.layers", 4)],
        {0: [-1], 2: [-4, -1]},
        ([3], [0, 3]),
    ),
    "t5": (
        [("encoder.block", 3), ("decoder.block", 2)],
        {0: ["decoder.-1"], 2: ["encoder.0", "decoder.-1"]},
        (["decoder.1"], ["encoder.0", "decoder.1"]),
    ),
}
FAMILIES = sorted(CASES)


def _layer_path(family, layer):
    stacks = CASES[family][0]
    if isinstance(layer, int):
        return "{}.{}.".format(stacks[0][0], layer)
    name, index = layer.split(".")
    path = [p for p, _ in stacks if p.startswith(name)][0]
    return "{}.{}.".format(path, index)


def _build(family, **config):
    kwargs = dict(
        r=4,
        target_modules=tiny_models.TARGETS[family],
        layer_schedule=CASES[family][1],
        init_seed=0,
        lora_dropout=0.0,
    )
    kwargs.update(config)
    return get_peft_model(tiny_models.BUILDERS[family](), ScheduledLoraConfig(**kwargs))


def _lora_modules(model):
    return sorted({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})


def _perturb(model):
    # Trained adapters have non-zero B; give every active adapter a deterministic "training".
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_B" in name:
                param.add_(0.05 * torch.arange(param.numel(), dtype=param.dtype).reshape(param.shape).sin())


def _out(model, family):
    model.eval()
    with torch.no_grad():
        output = model(**tiny_models.example_inputs(family))
    return output.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_stacks_are_discovered(family):
    stacks = discover_stacks(tiny_models.BUILDERS[family]())
    assert [(s.path, s.length) for s in stacks] == CASES[family][0]
    if family == "t5":
        assert [s.name for s in stacks] == ["encoder", "decoder"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lands_on_exactly_the_targets_of_preallocated_layers(family):
    model = _build(family)
    first, later = CASES[family][2]
    assert model.preallocated_layers == later
    prefixes = [_layer_path(family, layer) for layer in later]
    wrapped = _lora_modules(model)
    targets = tiny_models.TARGETS[family]
    expected = sorted(
        n
        for n, _ in tiny_models.BUILDERS[family]().named_modules()
        if any(n.startswith(p) for p in prefixes) and n.split(".")[-1] in targets
    )
    assert [w.split("base_model.model.", 1)[1] for w in wrapped] == expected
    assert model.peft_config["default"].peft_type == "LORA"  # runs as LoRA inside PEFT


@pytest.mark.parametrize("family", FAMILIES)
def test_activate_layers_trains_exactly_the_scheduled_layers(family):
    model = _build(family)
    first, later = CASES[family][2]
    # Right after get_peft_model every preallocated LoRA parameter requires grad (optimizer registration).
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad for p in lora.values())
    assert model.active_layers == first
    model.train()
    model(**tiny_models.example_inputs(family)).logits.sum().backward()
    assert model.activate_layers(0) == first
    assert model.activate_layers(0) == first  # idempotent
    active_prefixes = [_layer_path(family, layer) for layer in first]
    for name, param in lora.items():
        inside = any(p in name for p in active_prefixes)
        assert param.requires_grad == inside, name
        if not inside:
            assert param.grad is None, name
    assert model.activate_layers(5) == later
    assert model.active_layers == later
    assert all(p.requires_grad for p in lora.values())


def test_layer_one_never_captures_layers_ten_and_eleven():
    model = get_peft_model(
        tiny_models.bert(),
        ScheduledLoraConfig(target_modules=["query", "value"], layer_schedule={0: [1]}),
    )
    wrapped = _lora_modules(model)
    assert wrapped and all(".layer.1." in name for name in wrapped)
    assert model.activate_layers(0) == [1]


def test_regex_target_modules_with_a_schedule():
    pattern = r".*encoder\.layer\.(3|4|5)\.attention\.self\.(query|value)"
    model = get_peft_model(
        tiny_models.bert(),
        ScheduledLoraConfig(target_modules=pattern, layer_schedule={0: [5], 2: [4, 5], 4: [3, 4, 5]}),
    )
    assert len(_lora_modules(model)) == 6
    assert model.activate_layers(2) == [4, 5]
    assert model.peft_config["default"].target_modules == pattern  # the user's value is kept


def test_layers_pattern_overrides_discovery():
    model = get_peft_model(
        tiny_models.t5(),
        ScheduledLoraConfig(target_modules=["q"], layers_pattern="decoder.block", layer_schedule={0: [-1]}),
    )
    assert model.preallocated_layers == [1]  # one stack: plain ints
    assert all("decoder.block.1." in name for name in _lora_modules(model))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_frozen_layer_keeps_contributing_and_disable_adapter_restores_the_schedule(family):
    model = _build(family)
    first, later = CASES[family][2]
    model.activate_layers(0)
    _perturb(model)
    trained = _out(model, family)
    model.activate_layers(2)
    assert torch.equal(_out(model, family), trained)  # the new layer starts with B = 0
    model.activate_layers(2)
    frozen_later = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    with model.disable_adapter():
        base = _out(model, family)
    assert not torch.equal(base, trained)
    assert torch.equal(_out(model, family), trained)
    assert {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n} == frozen_later


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_merge_and_unload_equals_the_scheduled_output(family):
    model = _build(family, init_lora_weights=False)  # B != 0 at init: never-active adapters must not merge
    model.activate_layers(0)
    _perturb(model)
    expected = _out(model, family)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_out(merged, family), expected, rtol=1e-4, atol=1e-5)


def test_no_schedule_behaves_like_lora_config():
    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    torch.manual_seed(1)
    plain = get_peft_model(tiny_models.bert(seed=3), LoraConfig(**fields))
    torch.manual_seed(1)
    scheduled = get_peft_model(tiny_models.bert(seed=3), ScheduledLoraConfig(**fields))
    trainable = lambda m: sorted(n for n, p in m.named_parameters() if p.requires_grad)  # noqa: E731
    assert trainable(plain) == trainable(scheduled)
    for (name, a), (_, b) in zip(plain.named_parameters(), scheduled.named_parameters()):
        assert torch.equal(a, b), name  # same PEFT init from the same global RNG
    assert torch.equal(_out(plain, "bert"), _out(scheduled, "bert"))


def _train_epochs(schedule, epochs, preallocate=None):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_models.bert(),
        ScheduledLoraConfig(
            r=4,
            target_modules=["query", "value"],
            layer_schedule=schedule,
            preallocate_layers=preallocate,
            lora_dropout=0.1,
            init_seed=0,
            task_type="SEQ_CLS",
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    losses, snapshots = [], []
    model.train()
    for epoch in range(epochs):
        model.activate_layers(epoch)
        for _ in range(3):
            ids = torch.randint(1, 99, (4, 8), generator=generator)
            labels = torch.randint(0, 2, (4,), generator=generator)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    return losses, snapshots


def test_preallocation_is_bitwise_invisible_until_the_layer_activates():
    with_later, snaps_a = _train_epochs({0: [11], 3: [1, 11]}, 5)
    without, snaps_b = _train_epochs({0: [11]}, 3)
    # Epochs 0-2: identical losses and top-layer weights (dropout 0.1, AdamW with weight decay).
    for a, b in zip(with_later[:9], without):
        assert torch.equal(a, b)
    for name, value in snaps_b[2].items():
        assert torch.equal(snaps_a[2][name], value), name
    # Layer 1 is untouched until epoch 3, then trains.
    layer1 = [n for n in snaps_a[0] if ".layer.1." in n]
    assert layer1 and all(torch.equal(snaps_a[0][n], snaps_a[2][n]) for n in layer1)
    assert any(not torch.equal(snaps_a[2][n], snaps_a[4][n]) for n in layer1)


def test_frozen_layer_is_bitwise_still_under_adamw_weight_decay():
    _, snaps = _train_epochs({0: [11], 2: [1]}, 4)
    top = [n for n in snaps[0] if ".layer.11." in n]
    assert any(not torch.equal(snaps[0][n], snaps[1][n]) for n in top)
    assert all(torch.equal(snaps[1][n], snaps[3][n]) for n in top)


def test_seeded_init_and_global_rng_do_not_depend_on_preallocation():
    def build(preallocate):
        torch.manual_seed(0)
        model = get_peft_model(
            tiny_models.bert(),
            ScheduledLoraConfig(target_modules=["query"], layer_schedule={0: [11]}, preallocate_layers=preallocate),
        )
        return model, torch.get_rng_state()

    small, rng_small = build([11])
    big, rng_big = build([0, 3, 7, 11])
    assert torch.equal(rng_small, rng_big)
    top = {n: p for n, p in small.named_parameters() if ".layer.11." in n and "lora_" in n}
    other = dict(big.named_parameters())
    assert top and all(torch.equal(p, other[n]) for n, p in top.items())
    assert small.peft_config["default"].init_seed == big.peft_config["default"].init_seed == torch.initial_seed()


@pytest.mark.parametrize("family", FAMILIES)
def test_save_then_from_pretrained_continues_the_schedule(family, tmp_path):
    model = _build(family)
    first, later = CASES[family][2]
    model.activate_layers(0)
    _perturb(model)
    expected = _out(model, family)
    model.save_pretrained(str(tmp_path))
    saved = json.load(open(os.path.join(str(tmp_path), "adapter_config.json")))
    assert saved["peft_type"] == "SCHEDULED_LORA"
    assert saved["ever_active_layers"] == first

    loaded = PeftModel.from_pretrained(tiny_models.BUILDERS[family](), str(tmp_path), is_trainable=True)
    assert type(loaded.base_model).__name__ == "ScheduledLoraModel"
    assert loaded.peft_config["default"].layer_schedule == {int(k): v for k, v in CASES[family][1].items()}
    assert torch.equal(_out(loaded, family), expected)
    assert loaded.activate_layers(3) == later
    before = {n: p.detach().clone() for n, p in loaded.named_parameters() if "lora_" in n}
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
    loaded.train()
    loaded(**tiny_models.example_inputs(family)).logits.pow(2).mean().backward()
    optimizer.step()
    changed = {n for n, p in loaded.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])}
    later_prefixes = [_layer_path(family, layer) for layer in later]
    assert changed and all(any(p in n for p in later_prefixes) for n in changed)

    inference = PeftModel.from_pretrained(tiny_models.BUILDERS[family](), str(tmp_path))
    assert torch.equal(_out(inference, family), expected)
    assert not any(p.requires_grad for n, p in inference.named_parameters() if "lora_" in n)


_BLOCK_PEFT_LAYERSCHED = """
import importlib.abc, json, sys, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "peft_layersched":
            raise ImportError("peft_layersched is blocked in this process")
sys.meta_path.insert(0, Block())
try:
    import peft_layersched  # noqa
    raise SystemExit("peft_layersched was importable")
except ImportError:
    pass
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
inputs = torch.load(sys.argv[3])
with torch.no_grad():
    logits = model(**inputs).logits
expected = torch.load(sys.argv[4])
print(json.dumps({"max_abs_diff": float((logits - expected).abs().max()), "type": type(model.base_model).__name__}))
"""


def test_export_loads_in_vanilla_peft_without_this_package(tmp_path):
    model = _build("bert", task_type="SEQ_CLS", preallocate_layers=[1, 5, 11])
    model.activate_layers(2)
    _perturb(model)
    inputs = tiny_models.example_inputs("bert")
    expected = _out(model, "bert")
    config = export_lora(model, str(tmp_path / "export"))
    written = json.load(open(str(tmp_path / "export" / "adapter_config.json")))
    assert written["peft_type"] == "LORA"
    assert sorted(written["target_modules"]) == sorted(
        "bert.encoder.layer.{}.attention.self.{}".format(layer, kind)
        for layer in (1, 11)
        for kind in ("query", "value")
    )  # layer 5 never trained: not exported
    assert sorted(config.target_modules) == sorted(written["target_modules"])
    tiny_models.bert().save_pretrained(str(tmp_path / "base"))
    torch.save(inputs, str(tmp_path / "inputs.pt"))
    torch.save(expected, str(tmp_path / "expected.pt"))
    done = subprocess.run(
        [sys.executable, "-c", _BLOCK_PEFT_LAYERSCHED]
        + [str(tmp_path / p) for p in ("base", "export", "inputs.pt", "expected.pt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["type"] == "LoraModel"
    assert result["max_abs_diff"] < 1e-5
