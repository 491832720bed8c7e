"""Property tests (hypothesis) for the torch-free schedule core and its layer addressing."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from peft_layersched.layers import LayerIndex, LayerStack
from peft_layersched.schedule import parse_schedule

SETTINGS = settings(max_examples=200, deadline=None)

layer_ids = st.one_of(
    st.integers(min_value=-48, max_value=47),
    st.builds("decoder.{}".format, st.integers(min_value=-6, max_value=5)),
)
milestones = st.dictionaries(st.integers(min_value=0, max_value=1000), st.lists(layer_ids, max_size=6), min_size=1)


@SETTINGS
@given(milestones, st.integers(min_value=0, max_value=1200))
def test_active_set_is_the_last_phase_started(spec, t):
    schedule = parse_schedule(spec)
    started = [start for start in spec if start <= t]
    expected = spec[max(started)] if started else []
    assert schedule.active_at(t) == list(expected)
    # deterministic, no state: queries at other times in between change nothing
    for other in (0, t + 7, max(t - 3, 0)):
        schedule.active_at(other)
    assert schedule.active_at(t) == list(expected) == parse_schedule(spec).active_at(t)


@SETTINGS
@given(milestones)
def test_json_round_trip_is_identity(spec):
    schedule = parse_schedule(spec)
    through_json = json.loads(json.dumps(schedule.to_json()))  # int keys become strings
    again = parse_schedule(through_json)
    assert again.to_json() == schedule.to_json()
    for t in list(spec) + [0, 5000]:
        assert again.active_at(t) == schedule.active_at(t)


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


@settings(max_examples=400, deadline=None)
@given(bad_specs)
def test_invalid_specs_raise_only_value_or_type_errors(spec):
    try:
        parse_schedule(spec)
    except (ValueError, TypeError):
        return
    # Accepted: then it must be a real milestone schedule.
    assert isinstance(spec, dict) and spec


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
