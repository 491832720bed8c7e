"""Property tests (hypothesis) for the torch-free schedules, time checks and layer addressing.

The history of every registered kind is checked against brute force here; the typed schedules' own
promises, errors and Trainer runs: ``test_schedules.py``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_layersched import ScheduledLoraConfig
from peft_layersched.layers import LayerIndex, LayerStack
from peft_layersched.schedules import check_time, parse_schedule, registered_kinds

SETTINGS = settings(max_examples=300, deadline=None)
LIGHT = settings(max_examples=100, deadline=None)

layer_ids = st.one_of(
    st.integers(min_value=-48, max_value=47),
    st.builds("{}.{}".format, st.sampled_from(["encoder", "decoder", "model.layers"]), st.integers(-6, 5)),
)
phase_lists = st.lists(layer_ids, max_size=6)
milestones = st.dictionaries(st.integers(min_value=0, max_value=1000), phase_lists, min_size=1)


def _last_started(spec, t):
    started = [start for start in spec if start <= t]
    return list(spec[max(started)]) if started else []


def _parsed_or_error(spec):
    """``(schedule, None)`` if ``parse_schedule`` accepts ``spec``, else ``(None, the exception)``."""
    try:
        return parse_schedule(spec), None
    except Exception as error:  # the test asserts its type
        return None, error


def _assert_user_error(error):
    assert type(error) in (ValueError, TypeError), "{}: {}".format(type(error).__name__, error)
    assert str(error), "an error without a message"


# ----------------------------------------------------------------------------------- valid milestones


@SETTINGS
@given(milestones, st.integers(min_value=0, max_value=1200))
def test_active_set_is_the_last_phase_started(spec, t):
    schedule = parse_schedule(spec)
    expected = _last_started(spec, t)
    assert schedule.active_at(t) == expected
    assert schedule.boundaries() == sorted(spec)
    # Constant between boundaries: the set can only change at a phase start.
    if t > 0 and t not in spec:
        assert schedule.active_at(t - 1) == schedule.active_at(t)
    # Deterministic, no state: queries at other times in between change nothing.
    for other in (0, t + 7, max(t - 3, 0)):
        schedule.active_at(other)
    assert schedule.active_at(t) == expected == parse_schedule(spec).active_at(t)


@SETTINGS
@given(milestones)
def test_milestones_survive_json_and_the_config(spec):
    schedule = parse_schedule(spec)
    as_json = json.loads(json.dumps(schedule.to_json()))  # int keys become str
    assert all(isinstance(start, str) for start in as_json)
    again = parse_schedule(as_json)
    assert again.phases == schedule.phases
    assert again.to_json() == schedule.to_json() == {start: list(layers) for start, layers in sorted(spec.items())}
    for t in list(spec) + [0, 5000]:
        assert again.active_at(t) == schedule.active_at(t)
    every = [layer for _, layers in sorted(spec.items()) for layer in layers]
    assert again.all_layers() == sorted(set(every), key=every.index)
    for form in (spec, as_json):
        config = ScheduledLoraConfig(layer_schedule=form)
        assert config.is_scheduled
        assert list(config.layer_schedule.items()) == sorted(spec.items())  # int keys, in start order


# ----------------------------------------------------------------------------------- invalid specs

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
def broken_milestones(draw):
    spec = dict(draw(milestones))
    how = draw(st.sampled_from(["start", "layer", "list", "empty", "container"]))
    if how == "start":
        # The bad key goes in first: True == 1 and 2.0 == 2 would otherwise just overwrite a good key.
        broken = {draw(BAD_STARTS): draw(st.lists(layer_ids, max_size=4))}
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
            st.one_of(st.lists(st.lists(layer_ids, max_size=4), max_size=2), st.text(max_size=4), st.integers())
        )  # None: plain LoRA
    return spec


@SETTINGS
@given(broken_milestones())
def test_a_broken_milestone_spec_is_refused_by_the_parser_and_the_config(spec):
    with pytest.raises((ValueError, TypeError)):
        parse_schedule(spec)
    with pytest.raises((ValueError, TypeError)):
        ScheduledLoraConfig(layer_schedule=spec)


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
hashable_junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=4)
)
bad_specs = st.one_of(
    junk,
    st.dictionaries(hashable_junk, st.lists(layer_ids, max_size=2), min_size=1, max_size=3),
    st.dictionaries(st.integers(min_value=0, max_value=9), junk, min_size=1, max_size=3),
    st.dictionaries(st.integers(min_value=-9, max_value=-1), st.lists(layer_ids, max_size=2), min_size=1),
    st.dictionaries(st.integers(min_value=0, max_value=9), st.lists(junk, min_size=1, max_size=2), min_size=1),
)
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


@settings(max_examples=500, deadline=None)
@given(st.one_of(bad_specs, ANYTHING))
def test_any_value_is_parsed_or_refused_with_a_value_or_type_error(spec):
    schedule, error = _parsed_or_error(spec)
    if error is not None:
        _assert_user_error(error)
        return
    # Accepted: then it is a real milestone schedule whose phases came from the spec.
    assert isinstance(spec, dict) and spec
    assert len(schedule.phases) == len(spec)
    assert all(start >= 0 for start in schedule.boundaries())


# ----------------------------------------------------------------------------------- times and layer ids


@LIGHT
@given(st.one_of(st.integers(-50, 50), st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.none()))
def test_check_time(t):
    integral = not isinstance(t, bool) and (isinstance(t, int) or (isinstance(t, float) and t.is_integer()))
    if integral and t >= 0:
        assert check_time(t) == t and type(check_time(t)) is int
    else:
        with pytest.raises(ValueError if integral else TypeError):
            check_time(t)


@SETTINGS
@given(st.integers(min_value=1, max_value=64), st.lists(st.integers(min_value=-80, max_value=80), max_size=8))
def test_canonical_ids_are_in_range_or_rejected(depth, raws):
    index = LayerIndex([LayerStack("model.layers", "model.layers", depth)])
    for raw in raws:
        try:
            canonical = index.canonical(raw)
        except ValueError as error:
            assert not -depth <= raw < depth
            assert "valid indices are 0..{}".format(depth - 1) in str(error)
        else:
            assert -depth <= raw < depth
            assert 0 <= canonical < depth and canonical % depth == raw % depth


@SETTINGS
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=12), st.data())
def test_multi_stack_ids(encoder, decoder, data):
    index = LayerIndex(
        [LayerStack("encoder", "encoder.block", encoder), LayerStack("decoder", "decoder.block", decoder)]
    )
    i = data.draw(st.integers(min_value=-decoder, max_value=decoder - 1))
    assert index.canonical("decoder.{}".format(i)) == "decoder.{}".format(i % decoder)
    assert index.layer_of("decoder.block.{}.layer.0.SelfAttention.q".format(i % decoder)) == "decoder.{}".format(
        i % decoder
    )
    ids = index.all_layers()
    assert index.sort(reversed(ids)) == ids


# ----------------------------------------------------------------------------------- every kind's history

# layers_until(t) is what activate_layers(t) records as ever active, run_start(layer, t) when a layer's current run
# began (the callback's warm-up): both must be exactly what active_at says over 0..t, for every kind, adaptive ones
# included (with any decision log: one that starts late, so active_at previews the periods before it, or none).


def _history_index(draw):
    if draw(st.booleans()):
        return LayerIndex([LayerStack("model.layers", "model.layers", draw(st.integers(1, 10)))])
    return LayerIndex([LayerStack("encoder", "encoder.block", draw(st.integers(1, 4))),
                       LayerStack("decoder", "decoder.block", draw(st.integers(1, 4)))])


def _subset(draw, layers, min_size=0):
    if not layers:
        return []
    return draw(st.lists(st.sampled_from(layers), min_size=min_size, max_size=len(layers), unique=True))


def _decision_times(draw, every):
    times = draw(st.lists(st.integers(0, 30), max_size=5, unique=True))
    if draw(st.booleans()):
        times = [t * every for t in times]  # where LayerScheduler decides; else any time (a hand-edited log)
    return sorted(set(times))


def _milestones_case(draw, layers, pool, every):
    starts = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4, unique=True))
    return {start: _subset(draw, layers) for start in starts}


def _callable_case(draw, layers, pool, every):
    seed = draw(st.integers(0, 2 ** 20))

    def pure(t, seed=seed, choices=pool):
        return [layer for i, layer in enumerate(choices) if (seed >> ((t // every + i) % 20)) & 1]

    return pure


def _gradual_case(draw, layers, pool, every):
    return {"type": "gradual", "k": draw(st.integers(1, len(pool))), "n": draw(st.integers(0, 3)), "every": every,
            "from": draw(st.sampled_from(["top", "bottom"]))}


def _cyclic_case(draw, layers, pool, every):
    return {"type": "cyclic", "block": draw(st.integers(1, len(pool))), "every": every,
            "seed": draw(st.integers(0, 99)), "order": draw(st.sampled_from(["ascending", "descending", "random"]))}


def _sampled_case(draw, layers, pool, every):
    return {"type": "sampled", "k": draw(st.integers(1, len(pool))), "every": every, "seed": draw(st.integers(0, 99))}


def _progressive_case(draw, layers, pool, every):
    return {"type": "progressive", "start": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
            "full_at": draw(st.sampled_from([0.25, 0.75, 1.0])), "steps": draw(st.integers(1, 50)), "every": every,
            "seed": draw(st.integers(0, 99))}


def _decided_case(kind):
    def case(draw, layers, pool, every):
        always = _subset(draw, pool[:-1])[:2] if len(pool) > 1 and draw(st.booleans()) else []
        rest = [layer for layer in pool if layer not in always]
        spec = {"type": kind, "every": every, "always": always}
        times = _decision_times(draw, every)
        if kind == "adaptive":
            weights = {layer: draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])) for layer in rest}
            if not any(weights.values()):
                weights[rest[-1]] = 1.0
            choosable = [layer for layer in rest if weights[layer] > 0]
            spec.update(k=draw(st.integers(1, len(choosable))), policy=draw(st.sampled_from(["top", "sample"])),
                        explore=draw(st.sampled_from([0.0, 0.3])), seed=draw(st.integers(0, 99)))
            if draw(st.booleans()):
                spec["weights"] = {str(layer): weight for layer, weight in weights.items()}
            log = [_subset(draw, rest, min_size=1) for _ in times]
        else:
            spec["min_active"] = draw(st.integers(1, len(rest)))
            log, kept = [], list(rest)
            for _ in times:  # autofreeze only freezes: each decision keeps a (bottom-cut) part of the last
                kept = kept[draw(st.integers(0, len(kept) - 1)):]
                log.append(list(kept))
        spec["decisions"] = [{"t": t, "layers": chosen} for t, chosen in zip(times, log)]
        return spec

    return case


# kind -> (draw, layers, candidates, every) -> a layer_schedule of that kind that binds on the model.
HISTORY_CASES = {
    "milestones": _milestones_case,
    "callable": _callable_case,
    "gradual": _gradual_case,
    "cyclic": _cyclic_case,
    "sampled": _sampled_case,
    "progressive": _progressive_case,
    "adaptive": _decided_case("adaptive"),
    "autofreeze": _decided_case("autofreeze"),
}


def test_every_registered_kind_has_a_history_case():
    # A new kind registers itself; the brute-force history test below draws from the registry.
    assert set(HISTORY_CASES) == set(registered_kinds())


@st.composite
def specs_of_every_kind(draw):
    """(index, spec): a spec of any registered kind that binds on the model by construction."""
    index = _history_index(draw)
    layers = index.all_layers()
    kind = draw(st.sampled_from(list(registered_kinds())))
    every = draw(st.integers(1, 5))
    candidates = _subset(draw, layers, min_size=1) if draw(st.booleans()) else None
    spec = HISTORY_CASES[kind](draw, layers, candidates if candidates is not None else layers, every)
    if candidates is not None and isinstance(spec, dict) and "type" in spec:
        spec["layers"] = candidates
    return index, spec


def _check_history(schedule, index, horizon, queries):
    history = [set(schedule.active_at(t)) for t in range(horizon + 1)]
    for t in queries:
        assert set(schedule.layers_until(t)) == set().union(*history[: t + 1]), t
        for layer in index.all_layers():
            expected = None
            if layer in history[t]:
                expected = t
                while expected > 0 and layer in history[expected - 1]:
                    expected -= 1
            assert schedule.run_start(layer, t) == expected, (layer, t)


@settings(max_examples=200, deadline=None)
@given(specs_of_every_kind(), st.integers(0, 45), st.randoms(use_true_random=False), st.data())
def test_history_queries_of_every_kind_match_brute_force(case, horizon, rng, data):
    index, spec = case
    schedule = parse_schedule(spec).bind(index.all_layers(), index.canonical)
    queries = list(range(horizon + 1))
    if rng.random() < 0.5:
        rng.shuffle(queries)  # the caches must not depend on a monotone order
    _check_history(schedule, index, horizon, queries)
    if hasattr(schedule, "decide"):  # the adaptive kinds
        # A decision made now (LayerScheduler's) changes the history from its time on: the queries follow.
        t = data.draw(st.integers(0, horizon))
        measured = {layer: data.draw(st.one_of(st.none(), st.floats(0.0, 5.0))) for layer in schedule.pool}
        schedule.decide(t, measured)
        _check_history(schedule, index, horizon, queries)
