"""ScheduledLoraConfig (defaults, JSON round trip) and the torch-free schedule core (property tests)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from peft_layersched import ScheduledLoraConfig
from peft_layersched.schedule import check_time, parse_schedule

SETTINGS = settings(max_examples=300, deadline=None)
LIGHT = settings(max_examples=100, deadline=None)

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
def test_json_round_trip(kwargs, tmp_path):
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


# ------------------------------------------------------------------------------- schedule properties

layer_ids = st.one_of(
    st.integers(min_value=-48, max_value=47),
    st.builds("{}.{}".format, st.sampled_from(["encoder", "decoder", "model.layers"]), st.integers(-6, 5)),
)
phase_lists = st.lists(layer_ids, max_size=4)
specs = st.dictionaries(st.integers(min_value=0, max_value=500), phase_lists, min_size=1, max_size=5)


def _last_started(spec, t):
    started = [start for start in spec if start <= t]
    return list(spec[max(started)]) if started else []


@SETTINGS
@given(specs, st.integers(min_value=0, max_value=600))
def test_active_at_is_the_last_phase_started(spec, t):
    schedule = parse_schedule(spec)
    assert schedule.active_at(t) == _last_started(spec, t)
    assert schedule.boundaries() == sorted(spec)
    # Constant between boundaries: the set can only change at a phase start.
    if t > 0 and t not in spec:
        assert schedule.active_at(t - 1) == schedule.active_at(t)


@LIGHT
@given(specs)
def test_valid_specs_survive_json_and_the_config(spec):
    schedule = parse_schedule(spec)
    as_json = json.loads(json.dumps(schedule.to_json()))  # int keys become str
    assert all(isinstance(start, str) for start in as_json)
    again = parse_schedule(as_json)
    assert again.phases == schedule.phases
    assert again.to_json() == {start: list(layers) for start, layers in sorted(spec.items())}
    every = [layer for _, layers in sorted(spec.items()) for layer in layers]
    assert again.all_layers() == sorted(set(every), key=every.index)
    for form in (spec, as_json):
        config = ScheduledLoraConfig(layer_schedule=form)
        assert config.is_scheduled
        assert list(config.layer_schedule.items()) == sorted(spec.items())  # int keys, in start order


# A valid spec with one known-bad piece put in: must be rejected, with ValueError or TypeError only.
BAD_STARTS = st.one_of(
    st.integers(max_value=-1),
    st.booleans(),
    st.floats().filter(lambda x: not (x == x and float(x).is_integer() and x >= 0)),
    st.text(alphabet="abcxyz -_.", min_size=1, max_size=6),
    st.none(),
    st.tuples(st.integers()),
)
BAD_LAYERS = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.text(alphabet="abcxyz -_", min_size=0, max_size=6),
    st.sampled_from(["eleven", "1.5", "decoder.", ".1", "decoder.one", "--1", "1e3"]),
    st.lists(st.integers(), max_size=2),
    st.binary(max_size=3),
)
NOT_A_LIST = st.one_of(st.none(), st.integers(), st.text(max_size=4), st.dictionaries(st.integers(), st.integers()))


@st.composite
def broken_specs(draw):
    spec = dict(draw(specs))
    how = draw(st.sampled_from(["start", "layer", "list", "empty", "container"]))
    if how == "start":
        # The bad key goes in first: True == 1 and 2.0 == 2 would otherwise just overwrite a good key.
        broken = {draw(BAD_STARTS): draw(phase_lists)}
        for start, layers in spec.items():
            if start not in broken:
                broken[start] = layers
        spec = broken
    elif how == "layer":
        start = draw(st.sampled_from(sorted(spec)))
        layers = list(spec[start])
        layers.insert(draw(st.integers(0, len(layers))), draw(BAD_LAYERS))
        spec[start] = layers
    elif how == "list":
        spec[draw(st.sampled_from(sorted(spec)))] = draw(NOT_A_LIST)
    elif how == "empty":
        spec = {}
    else:
        spec = draw(
            st.one_of(st.lists(phase_lists, max_size=2), st.text(max_size=4), st.integers())
        )  # None: plain LoRA
    return spec


@SETTINGS
@given(broken_specs())
def test_invalid_specs_raise_only_value_or_type_error(spec):
    with pytest.raises((ValueError, TypeError)):
        parse_schedule(spec)
    with pytest.raises((ValueError, TypeError)):
        ScheduledLoraConfig(layer_schedule=spec)


ANYTHING = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.binary(max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.integers(), st.text(max_size=3), st.floats(allow_nan=False), st.booleans()),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=8,
)


@LIGHT
@given(ANYTHING)
def test_arbitrary_values_are_parsed_or_rejected_cleanly(spec):
    try:
        schedule = parse_schedule(spec)
    except (ValueError, TypeError):
        return
    # Accepted: then it is a real schedule whose phases came from the spec.
    assert isinstance(spec, dict) and spec
    assert len(schedule.phases) == len(spec)
    assert all(start >= 0 for start in schedule.boundaries())


@LIGHT
@given(st.one_of(st.integers(-50, 50), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.none()))
def test_check_time(t):
    integral = not isinstance(t, bool) and (isinstance(t, int) or (isinstance(t, float) and t.is_integer()))
    if integral and t >= 0:
        assert check_time(t) == t and type(check_time(t)) is int
    else:
        with pytest.raises(ValueError if integral else TypeError):
            check_time(t)
