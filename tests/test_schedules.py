"""The schedule library: gradual, cyclic, sampled, milestones and callables.

Properties (hypothesis) of every kind bound to random model depths and stacks, the error table, save/load
round trips, and one real ``transformers.Trainer`` run per kind (a table of cases).  Properties of the
unbound milestone core, layer addressing and every kind's history: ``test_schedule_properties.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from transformers import TrainerCallback

import peft_layersched.schedules as schedules_package
from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig
from peft_layersched.layers import LayerIndex, LayerStack
from peft_layersched.schedules import describe_schedule, parse_schedule, preview_span
from peft_layersched.schedules.cyclic import CyclicSchedule, CyclicSpec
from peft_layersched.schedules.gradual import GradualSchedule
from peft_layersched.schedules.sampled import SampledSchedule

from helpers import tiny_models
from helpers.toy_training import train

SETTINGS = settings(max_examples=150, deadline=None)

# ------------------------------------------------------------------------------------ strategies


@st.composite
def model_layers(draw):
    """(canonical layer list in model order, canonicalizer) of a one- or two-stack model."""
    if draw(st.booleans()):
        depth = draw(st.integers(min_value=1, max_value=40))
        index = LayerIndex([LayerStack("model.layers", "model.layers", depth)])
    else:
        encoder = draw(st.integers(min_value=1, max_value=8))
        decoder = draw(st.integers(min_value=1, max_value=8))
        index = LayerIndex(
            [LayerStack("encoder", "encoder.block", encoder), LayerStack("decoder", "decoder.block", decoder)]
        )
    return index


def raw_id(draw, index, layer):
    """A raw id (possibly negative) a user could write for canonical ``layer``."""
    if isinstance(layer, int):
        depth = index.stacks[0].length
        return draw(st.sampled_from([layer, layer - depth]))
    stack, position = layer.rsplit(".", 1)
    length = [s.length for s in index.stacks if s.name == stack][0]
    return draw(st.sampled_from([layer, "{}.{}".format(stack, int(position) - length)]))


def candidate_list(draw, index, min_size=1):
    layers = index.all_layers()
    chosen = draw(st.lists(st.sampled_from(layers), min_size=min_size, max_size=min(len(layers), 10), unique=True))
    return [raw_id(draw, index, layer) for layer in chosen]


@st.composite
def valid_specs(draw):
    """(index, spec) with a spec that binds on the model by construction."""
    index = draw(model_layers())
    layers = index.all_layers()
    kind = draw(st.sampled_from(["milestones", "gradual", "cyclic", "sampled"]))
    every = draw(st.integers(min_value=1, max_value=7))
    if kind == "milestones":
        starts = draw(st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=5, unique=True))
        return index, {start: candidate_list(draw, index, min_size=0) for start in starts}
    candidates = candidate_list(draw, index) if draw(st.booleans()) else None
    count = len(set(index.canonical(x) for x in candidates)) if candidates is not None else len(layers)
    if kind == "gradual":
        k = draw(st.integers(min_value=0, max_value=count))
        n = draw(st.integers(min_value=0 if k else 1, max_value=4))
        spec = {"type": "gradual", "k": k, "n": n, "every": every, "from": draw(st.sampled_from(["top", "bottom"]))}
        if draw(st.booleans()):
            spec["limit"] = draw(st.integers(min_value=max(k, 1), max_value=count + 3))
    elif kind == "cyclic":
        spec = {
            "type": "cyclic",
            "block": draw(st.integers(min_value=1, max_value=count)),  # more: refused (test_errors.py)
            "every": every,
            "order": draw(st.sampled_from(CyclicSpec.ORDERS)),
            "seed": draw(st.integers(min_value=-5, max_value=2**40)),
        }
    else:
        always = candidate_list(draw, index, min_size=0)[:2] if draw(st.booleans()) else []
        pool = set(index.canonical(x) for x in candidates) if candidates is not None else set(layers)
        pool -= set(index.canonical(x) for x in always)
        if not pool:
            always = []
            pool = set(index.canonical(x) for x in candidates) if candidates is not None else set(layers)
        spec = {
            "type": "sampled",
            "k": draw(st.integers(min_value=1, max_value=len(pool))),
            "every": every,
            "seed": draw(st.integers(min_value=0, max_value=2**31)),
            "always": always,
        }
    if candidates is not None:
        spec["layers"] = candidates
    return index, spec


def bound(index, spec):
    return parse_schedule(spec).bind(index.all_layers(), index.canonical)


times = st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=12)

# ------------------------------------------------------------------------------------ properties


@SETTINGS
@given(valid_specs(), times)
def test_active_sets_are_deterministic_and_within_the_preallocated_set(case, ts):
    index, spec = case
    first, second = bound(index, spec), bound(index, json.loads(json.dumps(spec)))
    everything = first.all_layers()
    assert set(everything) <= set(index.all_layers())
    assert index.sort(everything) == everything
    for t in ts:
        active = first.active_at(t)
        assert active == second.active_at(t) == first.active_at(t)  # no state: any rank, any resume
        assert set(active) <= set(everything)
        assert active == index.sort(active)  # canonical ids, model order, no duplicates


@SETTINGS
@given(valid_specs(), times)
def test_every_kind_round_trips_through_json(case, ts):
    index, spec = case
    parsed = parse_schedule(spec)
    through_json = json.loads(json.dumps(parsed.to_json()))
    again = parse_schedule(through_json)
    assert again.to_json() == parsed.to_json()
    assert parse_schedule(again.to_json()).to_json() == again.to_json()
    one, two = parsed.bind(index.all_layers(), index.canonical), again.bind(index.all_layers(), index.canonical)
    assert one.all_layers() == two.all_layers()
    assert [one.active_at(t) for t in ts] == [two.active_at(t) for t in ts]


@SETTINGS
@given(valid_specs(), times)
def test_each_kind_keeps_its_promise(case, ts):
    index, spec = case
    schedule = bound(index, spec)
    if isinstance(schedule, GradualSchedule):
        for t in ts:
            now, later = schedule.active_at(t), schedule.active_at(t + schedule.every)
            assert set(now) <= set(later)  # layers only join
            expected = min(schedule.k + schedule.n * (t // schedule.every), len(schedule.all_layers()))
            assert len(now) == expected
            ranked = schedule._ranked
            assert set(now) == set(ranked[: len(now)])  # contiguous from the chosen end
    elif isinstance(schedule, CyclicSchedule):
        blocks = schedule._blocks
        for t in ts:
            cycle = (t // schedule.every) // len(blocks)
            start = cycle * len(blocks) * schedule.every
            visited = [schedule.block_at(start + i * schedule.every) for i in range(len(blocks))]
            assert sorted(visited) == list(range(len(blocks)))  # every block once per cycle
            assert schedule.active_at(t) in blocks
    elif isinstance(schedule, SampledSchedule):
        for t in ts:
            active = schedule.active_at(t)
            assert len(active) == len(schedule._fixed) + schedule.k
            assert set(schedule._fixed) <= set(active)
            assert active == schedule.active_at(t - t % schedule.every)  # constant within a period


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=50),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(min_value=-60, max_value=60), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
field_names = st.sampled_from(["k", "n", "every", "from", "limit", "layers", "block", "order", "seed", "always", "x"])
typed_junk = st.builds(
    lambda kind, fields: dict(fields, type=kind),
    st.one_of(st.sampled_from(["gradual", "cyclic", "sampled", "callable"]), junk),
    st.dictionaries(field_names, junk, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(typed_junk, model_layers(), st.integers(min_value=0, max_value=100))
def test_typed_junk_is_refused_with_a_value_or_type_error_or_binds_within_its_layers(spec, index, t):
    try:
        schedule = bound(index, spec)
        schedule.active_at(t)
    except Exception as error:  # asserted: only the two user-error types, with a message
        assert type(error) in (ValueError, TypeError), "{}: {}".format(type(error).__name__, error)
        assert str(error), "an error without a message"
        return
    assert set(schedule.active_at(t)) <= set(schedule.all_layers())


@SETTINGS
@given(valid_specs())
def test_bound_milestones_are_the_canonical_unbound_ones(case):
    index, spec = case
    assume("type" not in spec)
    raw = parse_schedule(spec)
    schedule = bound(index, spec)
    for t in [0, 1, 5, 30, 61, 100]:
        assert schedule.active_at(t) == index.canonical_list(raw.active_at(t))


def test_seeded_orders_are_the_same_on_every_python():
    # Golden values: the draws hash (seed, period) with sha256, not Python's random or hash().
    layers = list(range(12))
    cyclic = parse_schedule({"type": "cyclic", "block": 3, "every": 1, "order": "random", "seed": 0}).bind(layers)
    sampled = parse_schedule({"type": "sampled", "k": 2, "every": 1, "seed": 0}).bind(layers)
    assert [cyclic.block_at(t) for t in range(8)] == GOLDEN_CYCLIC
    assert [sampled.active_at(t) for t in range(4)] == GOLDEN_SAMPLED


GOLDEN_CYCLIC = [2, 1, 0, 3, 1, 3, 2, 0]
GOLDEN_SAMPLED = [[9, 10], [0, 1], [4, 8], [1, 3]]


# (layer_schedule, description of the spec in epochs, of the schedule bound to 8 layers in steps, preview span)
DESCRIBED = [
    (
        {0: [-1], 3: [1, -1], 5: []},
        "milestones: from epoch 0: [-1]; from epoch 3: [1, -1]; from epoch 5: none",
        "milestones: from step 0: [7]; from step 3: [1, 7]; from step 5: none",
        7,
    ),
    (
        {"type": "gradual", "k": 1, "n": 2, "every": 3, "limit": 5},
        "gradual: 1 layer(s) from the top, +2 every 3 epoch(s), up to 5 (candidates: every layer)",
        "gradual: 1 layer(s) from the top, +2 every 3 step(s), up to 5 (candidates: every layer)",
        12,
    ),
    (
        {"type": "gradual", "k": 2, "n": 0, "from": "bottom", "layers": [0, 1, 2]},
        "gradual: 2 layer(s) from the bottom, +0 every 1 epoch(s) (candidates: [0, 1, 2])",
        "gradual: 2 layer(s) from the bottom, +0 every 1 step(s) (candidates: [0, 1, 2])",
        2,
    ),
    (
        {"type": "cyclic", "block": 2, "every": 4, "order": "random", "seed": 7},
        "cyclic: blocks of 2 layer(s), each for 4 epoch(s), random order (seed 7) (candidates: every layer)",
        "cyclic: blocks of 2 layer(s), each for 4 step(s), random order (seed 7) (candidates: every layer)",
        32,
    ),
    (
        {"type": "cyclic", "block": 3, "order": "descending", "layers": [-3, -2, -1]},
        "cyclic: blocks of 3 layer(s), each for 1 epoch(s), descending order (candidates: [-3, -2, -1])",
        "cyclic: blocks of 3 layer(s), each for 1 step(s), descending order (candidates: [-3, -2, -1])",
        2,
    ),
    (
        {"type": "sampled", "k": 2, "every": 5, "seed": 1, "always": [-1]},
        "sampled: 2 layer(s) drawn every 5 epoch(s), seed 1, always [-1] (candidates: every layer)",
        "sampled: 2 layer(s) drawn every 5 step(s), seed 1, always [-1] (candidates: every layer)",
        40,
    ),
    ({"type": "callable", "name": "m.f"}, "callable (not saved): m.f", "callable (not saved): m.f", 10),
]


@pytest.mark.parametrize("spec, epochs, steps, span", DESCRIBED, ids=[str(case[0]) for case in DESCRIBED])
def test_descriptions_and_preview_spans(spec, epochs, steps, span):
    parsed = parse_schedule(spec)
    schedule = parsed.bind(list(range(8)))
    assert describe_schedule(parsed, "epoch") == epochs
    assert describe_schedule(schedule, "step") == steps  # bound milestones: canonical ids
    assert preview_span(schedule) == span
    # A bound schedule given back as a layer_schedule is its spec as bound (milestones: canonical ids).
    assert parse_schedule(schedule).bind(list(range(8))).all_layers() == schedule.all_layers()
    assert describe_schedule(parse_schedule(schedule), "step") == steps


def test_every_registered_kind_keeps_the_contract():
    for kind, spec_class in schedules_package.registered_kinds().items():
        assert spec_class.kind == kind
        assert spec_class.describe is not schedules_package.ScheduleSpec.describe, kind  # it words itself
        assert issubclass(spec_class.runtime, schedules_package.Schedule), kind
    assert schedules_package.kind_names() == ["gradual", "cyclic", "sampled", "progressive", "adaptive", "autofreeze"]


@pytest.mark.parametrize("spec, named", [
    ({0: [-1], 3: [1, -1]}, [-1, 1]),
    ({"type": "gradual"}, []),
    ({"type": "sampled", "layers": [0, 1, 2], "always": [-1]}, [0, 1, 2, -1]),
    ({"type": "autofreeze", "layers": ["decoder.0"]}, ["decoder.0"]),
    ({"type": "callable", "name": "m.f"}, []),
])
def test_a_spec_lists_the_layers_it_names(spec, named):
    assert parse_schedule(spec).named_layers() == named


def test_a_callable_is_described_by_its_name():
    parsed = parse_schedule(_alternate)
    name = f"{_alternate.__module__}._alternate"
    assert describe_schedule(parsed, "epoch") == f"callable: {name}(epoch)"
    assert describe_schedule(parsed.bind(list(range(4))), "step") == f"callable: {name}(step)"
    assert preview_span(parsed.bind(list(range(4)))) == 10


def test_the_schedule_core_imports_without_torch(monkeypatch):
    # The schedules package on its own, outside peft_layersched (whose __init__ imports torch).
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    folder = os.path.dirname(schedules_package.__file__)
    name = "_schedule_core_without_torch"
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its kind modules import it by name
    try:
        spec.loader.exec_module(module)
        assert list(module.registered_kinds()) == list(schedules_package.registered_kinds())
        gradual = module.parse_schedule({"type": "gradual", "k": 1, "n": 1, "every": 2}).bind(list(range(4)))
        assert [gradual.active_at(t) for t in range(0, 8, 2)] == [[3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    finally:
        for key in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
            del sys.modules[key]


def test_no_schedule_module_imports_torch():
    # Also the imports inside functions, which loading the package does not run.
    import ast

    folder = os.path.dirname(schedules_package.__file__)
    for file_name in sorted(os.listdir(folder)):
        if not file_name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, file_name)).read())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level}
        assert imported <= {"__future__", "copy", "hashlib", "math", "operator", "re", "typing"}, (file_name, imported)


# ------------------------------------------------------------------------------------ errors

# (case id, layer_schedule, exception, regex the message must contain) -- refused by the config itself.
SPEC_ERRORS = [
    ("unknown type", {"type": "linear"}, ValueError,
     r"'type' must be one of \['gradual', 'cyclic', 'sampled', 'progressive', 'adaptive', 'autofreeze'\]"),
    ("progressive start > 1", {"type": "progressive", "start": 1.5}, ValueError,
     r"type 'progressive'.*'start' must be a fraction, 0 <= x <= 1 .*got 1.5"),
    ("progressive full_at 0", {"type": "progressive", "full_at": 0}, ValueError,
     r"'full_at' must be a fraction, 0 < x <= 1"),
    ("progressive start as str", {"type": "progressive", "start": "0.1"}, TypeError,
     r"'start' must be a number .*got '0.1' \(str\)"),
    ("progressive steps 0", {"type": "progressive", "steps": 0}, ValueError, r"'steps' must be >= 1"),
    ("progressive unknown key", {"type": "progressive", "k": 2}, ValueError,
     r"unknown key\(s\) \['k'\]; valid keys: 'type', 'start'"),
    ("every 0", {"type": "gradual", "every": 0}, ValueError, r"type 'gradual'.*'every' must be >= 1"),
    ("k as str", {"type": "gradual", "k": "1"}, TypeError, r"'k' must be an int .*got '1' \(str\)"),
    ("k as bool", {"type": "sampled", "k": True}, TypeError, r"'k' must be an int"),
    ("from middle", {"type": "gradual", "from": "middle"}, ValueError, r"'from' must be one of \['top', 'bottom'\]"),
    ("nothing ever trains", {"type": "gradual", "k": 0, "n": 0}, ValueError, r"'k' and 'n' are both 0"),
    ("limit below k", {"type": "gradual", "k": 3, "limit": 2}, ValueError, r"'limit' \(2\) is smaller than 'k' \(3\)"),
    ("unknown order", {"type": "cyclic", "order": "shuffled"}, ValueError, r"'ascending', 'descending', 'random'"),
    ("typo key", {"type": "cyclic", "blocks": 2}, ValueError, r"unknown key\(s\) \['blocks'\]; valid keys: 'type'"),
    ("sampled k 0", {"type": "sampled", "k": 0}, ValueError, r"'k' must be >= 1"),
    ("empty candidates", {"type": "sampled", "layers": []}, ValueError, r"'layers' is an empty list"),
    ("always not a list", {"type": "sampled", "always": "11"}, TypeError, r"'always': expected a list of layer ids"),
    ("word layer", {"type": "cyclic", "layers": ["eleven"]}, ValueError, r"'eleven' is not a layer id"),
    ("float seed", {"type": "sampled", "seed": 1.5}, TypeError, r"'seed' must be an int"),
    ("callable key", {"type": "callable", "fn": "x"}, ValueError, r"unknown key\(s\) \['fn'\]"),
    ("not a schedule", [3], TypeError, r"must be a dict .*a dict with a 'type' key.*or a callable"),
]


@pytest.mark.parametrize("spec,error,message", [c[1:] for c in SPEC_ERRORS], ids=[c[0] for c in SPEC_ERRORS])
def test_spec_errors(spec, error, message):
    with pytest.raises(error, match=message):
        ScheduledLoraConfig(target_modules=["query"], layer_schedule=spec)


def _outside(t):
    return [0, 3]


def _word(t):
    return ["three"]


# (case id, config kwargs, regex) -- refused once the model's layers are known (4-layer BERT).
MODEL_ERRORS = [
    ("k beyond depth", {"layer_schedule": {"type": "sampled", "k": 5}}, r"'k' is 5 but there are only 4 candidate"),
    ("gradual k beyond depth", {"layer_schedule": {"type": "gradual", "k": 5}}, r"only 4 candidate layers"),
    ("candidate out of range", {"layer_schedule": {"type": "cyclic", "layers": [7]}}, r"layer 7 is out of range"),
    (
        "sampled outside preallocation",
        {"layer_schedule": {"type": "sampled", "layers": [0, 1]}, "preallocate_layers": [1, 2]},
        r"uses layer\(s\) \[0\] that preallocate_layers",
    ),
    (
        "callable outside preallocation",
        {"layer_schedule": _outside, "preallocate_layers": [3]},
        r"_outside\(0\) returned layer\(s\) \[0\], which carry no adapter",
    ),
    ("callable returns a word", {"layer_schedule": _word}, r"'three' is not a layer id"),
]


@pytest.mark.parametrize("kwargs,message", [c[1:] for c in MODEL_ERRORS], ids=[c[0] for c in MODEL_ERRORS])
def test_model_errors(kwargs, message):
    config = ScheduledLoraConfig(target_modules=["query", "value"], **kwargs)
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_models.bert(num_layers=4), config)


def test_candidates_default_to_layers_with_target_modules():
    # A regex that targets layers 1-2 only: "every layer" means every layer that can carry an adapter.
    targets = r".*encoder\.layer\.(1|2)\.attention\.self\.query"
    config = ScheduledLoraConfig(target_modules=targets, layer_schedule={"type": "cyclic", "every": 1})
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    assert model.preallocated_layers == [1, 2]
    assert [model.activate_layers(t) for t in range(3)] == [[1], [2], [1]]


# ------------------------------------------------------------------------------------ save / load


def _alternate(t):
    return [3] if (t // 3) % 2 == 0 else [0, 2]


ROUND_TRIPS = [
    ("milestones", {0: [-1], 2: [1, -1]}),
    ("gradual", {"type": "gradual", "k": 1, "n": 1, "every": 2, "from": "top", "limit": 3}),
    ("cyclic", {"type": "cyclic", "block": 2, "every": 3, "order": "random", "seed": 7, "layers": [0, 1, 2]}),
    ("sampled", {"type": "sampled", "k": 1, "every": 2, "seed": 3, "always": [-1]}),
]


@pytest.mark.parametrize("spec", [c[1] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_save_and_load_keep_the_schedule(tmp_path, spec):
    config = ScheduledLoraConfig(target_modules=["query", "value"], layer_schedule=spec, init_seed=0)
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    expected = [model.activate_layers(t) for t in range(12)]
    model.save_pretrained(str(tmp_path))
    with open(os.path.join(str(tmp_path), "adapter_config.json")) as handle:
        saved = json.load(handle)["layer_schedule"]
    assert parse_schedule(saved).to_json() == parse_schedule(spec).to_json()
    loaded = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), str(tmp_path), is_trainable=True)
    assert loaded.peft_config["default"].layer_schedule == config.layer_schedule
    assert loaded.preallocated_layers == model.preallocated_layers
    assert loaded.ever_active_layers == model.ever_active_layers
    assert [loaded.activate_layers(t) for t in range(12)] == expected


def test_a_callable_schedule_is_not_saved_and_can_be_given_back(tmp_path):
    config = ScheduledLoraConfig(target_modules=["query", "value"], layer_schedule=_alternate, init_seed=0)
    assert get_peft_model(tiny_models.bert(num_layers=4), config).preallocated_layers == [0, 1, 2, 3]
    config = ScheduledLoraConfig(
        target_modules=["query", "value"], layer_schedule=_alternate, preallocate_layers=[0, 2, 3], init_seed=0
    )
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    assert model.preallocated_layers == [0, 2, 3]
    expected = [model.activate_layers(t) for t in range(9)]
    assert expected[:6] == [[3], [3], [3], [0, 2], [0, 2], [0, 2]]
    assert json.loads(json.dumps(config.to_dict()["layer_schedule"]))["type"] == "callable"
    with pytest.warns(UserWarning, match=r"callable .*_alternate, which is not serialized.*set_layer_schedule"):
        model.save_pretrained(str(tmp_path))
    assert config.layer_schedule is _alternate  # the in-memory config keeps the function
    loaded = PeftModel.from_pretrained(tiny_models.bert(num_layers=4), str(tmp_path), is_trainable=True)
    name = _alternate.__module__ + "._alternate"
    assert loaded.peft_config["default"].layer_schedule == {"type": "callable", "name": name}
    assert loaded.ever_active_layers == [0, 2, 3]
    with pytest.raises(ValueError, match=r"not saved with the adapter.*model.set_layer_schedule\(_alternate\)"):
        loaded.activate_layers(0)
    loaded.set_layer_schedule(_alternate)
    assert [loaded.activate_layers(t) for t in range(9)] == expected
    with pytest.raises(ValueError, match=r"carry no adapter"):
        loaded.set_layer_schedule({"type": "cyclic", "layers": [0, 1]})


# ------------------------------------------------------------------------------------ Trainer runs


class StepProbe(TrainerCallback):
    """Per optimizer step: the layers whose LoRA parameters required grad, and the layers that moved."""

    def __init__(self):
        self.trainable = {}  # global step after the update -> layers trainable during it
        self.moved = {}  # global step after the update -> layers whose LoRA weights changed in it
        self._before = {}

    def _weights(self, model):
        params = model.base_model.layer_parameters()
        return {layer: torch.cat([p.detach().reshape(-1) for p in ps]).clone() for layer, ps in params.items()}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = self._weights(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Listed before LayerScheduleCallback: runs before any switch (or warm-up scaling) at this step.
        params = model.base_model.layer_parameters()
        self.trainable[state.global_step] = sorted(layer for layer, ps in params.items() if ps[0].requires_grad)
        after = self._weights(model)
        self.moved[state.global_step] = sorted(k for k in after if not torch.equal(self._before[k], after[k]))


STEPS_PER_EPOCH = 4  # ToyClassification(16) with batch 4

# (case id, layer_schedule, schedule_unit, epochs, callback options): each a real Trainer run, 4-layer BERT.
TRAINER_CASES = [
    ("milestones", {0: [3], 2: [1, 3]}, "epoch", 3, {}),
    ("gradual-epoch", {"type": "gradual", "k": 1, "n": 1, "every": 1, "limit": 3}, "epoch", 4, {}),
    ("gradual-step-bottom", {"type": "gradual", "k": 1, "n": 2, "every": 3, "from": "bottom"}, "step", 2, {}),
    ("cyclic-step-random", {"type": "cyclic", "block": 2, "every": 2, "order": "random", "seed": 1}, "step", 3, {}),
    (
        "cyclic-epoch-descending-warmup-reset",
        {"type": "cyclic", "block": 1, "every": 1, "order": "descending", "layers": [1, 2, 3]},
        "epoch",
        4,
        {"new_layer_warmup_steps": 2, "reactivated_state": "reset"},
    ),
    ("sampled-step", {"type": "sampled", "k": 1, "every": 2, "seed": 0, "always": [-1]}, "step", 3, {}),
    ("callable-step", _alternate, "step", 3, {}),
]


@pytest.mark.parametrize(
    "spec,unit,epochs,options", [c[1:] for c in TRAINER_CASES], ids=[c[0] for c in TRAINER_CASES]
)
def test_trainer_runs_the_schedule(tmp_path, spec, unit, epochs, options):
    config = ScheduledLoraConfig(
        r=4, target_modules=["query", "value"], layer_schedule=spec, schedule_unit=unit, task_type="SEQ_CLS"
    )
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    schedule = model.base_model._adapter(None)[1].schedule
    probe = StepProbe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = train(model, tmp_path, callbacks=[probe, LayerScheduleCallback(**options)], num_train_epochs=epochs)
    steps = sorted(probe.trainable)
    assert steps == list(range(1, epochs * STEPS_PER_EPOCH + 1))

    def time_of(step):  # the schedule time during optimizer step `step` (1-based)
        return step - 1 if unit == "step" else (step - 1) // STEPS_PER_EPOCH

    for step in steps:
        expected = schedule.active_at(time_of(step))
        assert probe.trainable[step] == expected, "step {}".format(step)
        assert probe.moved[step] == expected, "step {}: layers {} moved".format(step, probe.moved[step])
    # Nothing switches in after the last step: ever-active = the layers that trained; the position says
    # how far the schedule ran (step unit: the steps done; epoch unit: the last epoch).
    seen = [time_of(step) for step in steps]
    assert model.ever_active_layers == sorted(set().union(*(schedule.active_at(t) for t in seen)))
    assert model.peft_config["default"].schedule_position == (steps[-1] if unit == "step" else epochs - 1)
    switches = [(e["schedule_time"], e["active_layers"]) for e in trainer.state.log_history if "schedule_time" in e]
    changes = []
    for t in seen:
        text = ",".join(str(x) for x in schedule.active_at(t)) or "none"
        if not changes or changes[-1][1] != text:
            changes.append((t, text))
    assert switches == changes
