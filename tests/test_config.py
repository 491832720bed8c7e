"""ScheduledLoraConfig: its defaults, and the JSON round trip through save_pretrained / from_pretrained.

Schedule property tests: ``test_schedule_properties.py`` (milestones) and ``test_schedules.py`` (typed).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from peft import LoraConfig

from peft_layersched import ScheduledLoraConfig

NEW_FIELDS = {
    "layer_schedule": None,
    "schedule_unit": "epoch",
    "preallocate_layers": None,
    "layers_pattern": None,
    "layer_stacks": None,
    "init_seed": None,
    "ever_active_layers": None,
}


def test_defaults():
    config = ScheduledLoraConfig()
    # LoRA in memory (every LoRA path of PEFT applies), SCHEDULED_LORA in to_dict() and on disk.
    assert config.peft_type == "LORA" and config.to_dict()["peft_type"] == "SCHEDULED_LORA"
    # PEFT 0.3.0 ships None for both; ours are the same on every PEFT.
    assert (config.lora_alpha, config.lora_dropout) == (8, 0.0)
    assert {name: getattr(config, name) for name in NEW_FIELDS} == NEW_FIELDS
    assert not config.is_scheduled and config.schedule() is None
    # Every other LoraConfig field keeps LoraConfig's default.
    plain = LoraConfig()
    for field in dataclasses.fields(LoraConfig):
        if field.name not in {"peft_type", "lora_alpha", "lora_dropout"}:
            assert getattr(config, field.name) == getattr(plain, field.name), field.name


# (case id, config kwargs): each is saved with save_pretrained and read back with from_pretrained.
ROUND_TRIPS = [
    ("plain", dict(r=4, target_modules=["query", "value"])),
    (
        "int ids",
        dict(
            r=4,
            target_modules=["query", "value"],
            layer_schedule={0: [11], 3: [1, 11], 10: []},
            preallocate_layers=[1, 5, 11],
            init_seed=7,
            ever_active_layers=[11],
            layer_stacks="encoder.layer",
        ),
    ),
    (
        "stack ids, steps",
        dict(
            target_modules=r".*\.(q|v)",
            layer_schedule={0: ["decoder.-1"], 250: ["encoder.0", "decoder.-1"]},
            schedule_unit="step",
            layer_stacks=["encoder.block", "decoder.block"],
            lora_alpha=16,
            lora_dropout=0.1,
        ),
    ),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_config_survives_save_pretrained_and_from_pretrained(kwargs, tmp_path):
    config = ScheduledLoraConfig(**kwargs)
    config.save_pretrained(str(tmp_path))
    with open(os.path.join(str(tmp_path), "adapter_config.json")) as handle:
        written = json.load(handle)
    assert written["peft_type"] == "SCHEDULED_LORA"
    if config.layer_schedule is not None:
        assert sorted(written["layer_schedule"]) == sorted(str(k) for k in config.layer_schedule)  # JSON keys: str

    loaded = ScheduledLoraConfig.from_pretrained(str(tmp_path))
    assert type(loaded) is ScheduledLoraConfig
    assert loaded.peft_type == "LORA" and loaded.to_dict() == config.to_dict()
    for name in list(kwargs) + list(NEW_FIELDS):
        value = getattr(loaded, name)
        assert value == getattr(config, name), name
        if name == "layer_schedule" and value is not None:
            assert all(type(start) is int for start in value), value  # int keys survive
    if config.layer_schedule is not None:
        assert loaded.schedule().phases == config.schedule().phases


def test_from_lora_config_copies_lora_fields_and_never_the_schedule_or_the_object():
    # rank_pattern: a dict field, from PEFT 0.7 on
    pattern = {"rank_pattern": {"query": 2}} if "rank_pattern" in LoraConfig.__dataclass_fields__ else {}
    source = LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                        lora_dropout=0.1, **pattern)
    before = source.to_dict()
    config = ScheduledLoraConfig.from_lora_config(source, layer_schedule={"0": [-1]}, schedule_unit="step")
    assert source.to_dict() == before  # the tool's object is left as it is
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.1)
    assert all(getattr(config, name) == value for name, value in pattern.items())
    assert (config.layer_schedule, config.schedule_unit, config.init_seed) == ({0: [-1]}, "step", None)
    assert config.target_modules == source.target_modules and config.target_modules is not source.target_modules
    config.modules_to_save.append("pooler")
    assert source.modules_to_save == ["classifier"]  # deep copies: nothing shared
    # A scheduled source gives its LoRA fields, never its schedule state.
    scheduled = ScheduledLoraConfig(r=2, layer_schedule={0: [1]}, init_seed=5, ever_active_layers=[1])
    again = ScheduledLoraConfig.from_lora_config(scheduled)
    assert (again.r, again.layer_schedule, again.init_seed, again.ever_active_layers) == (2, None, None, None)
    with pytest.raises(TypeError, match="no field 'rank'"):
        ScheduledLoraConfig.from_lora_config(source, rank=4)


def test_to_lora_config_is_a_plain_lora_config_with_the_lora_fields():
    config = ScheduledLoraConfig(r=4, target_modules=["query"], layer_schedule={0: [1]}, lora_dropout=0.1)
    plain = config.to_lora_config(target_modules=["encoder.layer.1.attention.self.query"], inference_mode=True)
    assert type(plain) is LoraConfig and plain.to_dict()["peft_type"] == "LORA"
    assert (plain.r, plain.lora_dropout, plain.inference_mode) == (4, 0.1, True)
    assert set(plain.target_modules) == {"encoder.layer.1.attention.self.query"}
    assert set(config.target_modules) == {"query"} and not config.inference_mode  # this config is untouched
