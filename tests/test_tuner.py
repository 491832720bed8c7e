"""The scheduled tuner on every model family: placement, activation, bypass, disable/merge, plain-LoRA parity,
and, in real training loops (AdamW with weight decay, dropout), bitwise invisibility of preallocated adapters
until their phase and frozen layers that stay bitwise still."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_layersched import ScheduledAdapter

from helpers.scheduled_cases import (
    BY_FAMILY,
    CASES,
    logits,
    lora_modules,
    lora_params,
    loss,
    perturb,
    trainable,
)
from helpers.snapshots import lora as snapshot


def _requires_grad(model):
    return {name: param.requires_grad for name, param in lora_params(model).items()}


def _base_frozen(model):
    return all(
        not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    )


@pytest.mark.parametrize("extra", [False, True], ids=["scheduled", "plus spare"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_lora_lands_on_exactly_the_targets_of_preallocated_layers(case, extra):
    preallocate = [case.raw_spare, case.raw_low, case.raw_top] if extra else None
    model = case.build(preallocate_layers=preallocate)
    layers = case.sort(case.later + ([case.spare] if extra else []))
    assert model.preallocated_layers == layers
    assert lora_modules(model) == case.target_names(layers)
    assert sorted(model.scheduled_modules()) == case.target_names(layers)
    assert all(case.layer_of(name) == layer for name, layer in model.scheduled_modules().items())
    grouped = model.layer_parameters()
    assert list(grouped) == layers
    assert sorted(id(p) for params in grouped.values() for p in params) == sorted(
        id(p) for p in lora_params(model).values()
    )
    assert _base_frozen(model)
    assert model.peft_config["default"].peft_type == "LORA"  # runs as LoRA inside PEFT


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_before_activation_everything_registers_but_only_the_first_phase_gets_grads(case):
    model = case.build(preallocate_layers=[case.raw_spare, case.raw_low, case.raw_top], lora_dropout=0.1)
    params = lora_params(model)
    # An optimizer built the usual way right now holds every preallocated adapter.
    registered = {id(p) for p in model.parameters() if p.requires_grad}
    assert registered == {id(p) for p in params.values()}
    assert model.active_layers == case.first
    model.train()
    loss(model, case, seed=0).backward()
    for name, param in params.items():
        if case.layer_of(name) == case.top:
            assert param.grad is not None, name
        else:
            assert param.grad is None, name  # bypassed: not part of the graph


# t -> active layers, in order; going back to t=0 at the end freezes the layer added at t=2.
ACTIVATIONS = [(0, "first"), (1, "first"), (2, "later"), (2, "later"), (7, "later"), (0, "first")]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_activate_layers_trains_exactly_the_scheduled_layers(case):
    model = case.build(preallocate_layers=[case.raw_spare, case.raw_low, case.raw_top])
    model.train()
    ever = set()
    for step, (t, which) in enumerate(ACTIVATIONS):
        loss(model, case, seed=step).backward()  # every trainable adapter now holds a grad
        before = snapshot(model)
        expected = getattr(case, which)
        active = model.activate_layers(t)
        assert active == expected
        assert model.active_layers == expected
        active.append("junk")  # the return value is a copy
        assert model.active_layers == expected
        ever.update(expected)
        assert model.ever_active_layers == case.sort(ever)
        for name, param in lora_params(model).items():
            inside = case.layer_of(name) in expected
            assert param.requires_grad == inside, (t, name)
            if not inside:
                assert param.grad is None, (t, name)
            assert torch.equal(param, before[name]), name  # activation never touches values
        assert _base_frozen(model)
    assert model.ever_active_layers == case.later


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_trained_then_frozen_layer_keeps_contributing(case):
    model = case.build(layer_schedule={0: [case.raw_top], 2: [case.raw_low]})
    with model.disable_adapter():
        base = logits(model, case)
    model.activate_layers(0)
    perturb(model)  # "train" the top layer
    trained_top = logits(model, case)
    assert not torch.equal(trained_top, base)
    assert model.activate_layers(2) == [case.low]
    assert torch.equal(logits(model, case), trained_top)  # top frozen, still applied; low starts at B = 0
    perturb(model)  # "train" the low layer
    both = logits(model, case)
    assert not torch.equal(both, trained_top)
    assert model.activate_layers(0) == [case.top]
    assert torch.equal(logits(model, case), both)  # low frozen now, still applied


@pytest.mark.parametrize("activated", [False, True], ids=["before activate", "after activate"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_disable_adapter_restores_the_schedule_state(case, activated):
    # init_lora_weights=False: every adapter starts with B != 0, so a lost bypass would show in the output.
    model = case.build(preallocate_layers=[case.raw_spare, case.raw_low, case.raw_top], init_lora_weights=False)
    if activated:
        model.activate_layers(2)
        model.activate_layers(0)
    flags, out = _requires_grad(model), logits(model, case)
    with model.disable_adapter():
        plain = logits(model, case)
    torch.testing.assert_close(plain, logits(case.base(), case), rtol=0, atol=1e-6)
    assert not torch.allclose(plain, out)
    assert _requires_grad(model) == flags
    assert torch.equal(logits(model, case), out)
    assert model.active_layers == case.first


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_merge_and_unload_equals_the_scheduled_output(case):
    # B != 0 everywhere from init: merging a bypassed (never-active) adapter would change the output.
    model = case.build(preallocate_layers=[case.raw_spare, case.raw_low, case.raw_top], init_lora_weights=False)
    model.activate_layers(0)
    perturb(model)
    expected = logits(model, case)
    try:
        merged = model.merge_and_unload()
    except ValueError as error:
        if "GPT2" in str(error):  # PEFT 0.3.0 refuses to merge GPT-2 (Conv1D) at all
            pytest.skip("this PEFT cannot merge LoRA into GPT-2: {}".format(error))
        raise
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, case), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheduled", [True, False], ids=["scheduled", "plain LoRA"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_merge_then_unmerge_adapter_is_silent_and_gives_the_output_back(case, scheduled):
    # The spare never runs (bypassed); B != 0 from init, so a merge of it would change the output.
    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case.targets, init_lora_weights=False)
    if scheduled:
        model = case.build(preallocate_layers=[case.raw_spare, case.raw_low, case.raw_top], **fields)
    else:
        model = get_peft_model(case.base(), LoraConfig(**fields))
    before = logits(model, case)
    with warnings.catch_warnings(record=True) as merging:
        warnings.simplefilter("always")
        model.merge_adapter()
    merged = logits(model, case)  # (PEFT 0.3-0.5: a bypassed layer unmerges itself in this forward)
    with warnings.catch_warnings(record=True) as unmerging:
        warnings.simplefilter("always")
        model.unmerge_adapter()
    assert [str(w.message) for w in merging + unmerging] == []
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(model, case), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_no_schedule_behaves_like_lora_config(case):
    # B != 0 (init_lora_weights=False) so the outputs say something; PEFT's own init draws from the global RNG.
    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=case.targets, init_lora_weights=False)
    models, rng = [], []
    for config in (LoraConfig(**fields), case.config(layer_schedule=None, init_seed=None, **fields)):
        models.append(get_peft_model(case.base(seed=3), config))
        rng.append(torch.get_rng_state())
    plain, scheduled = models
    assert trainable(plain) == trainable(scheduled)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in scheduled.named_parameters()]
    for (name, a), (_, b) in zip(plain.named_parameters(), scheduled.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(rng[0], rng[1])
    assert torch.equal(logits(plain, case), logits(scheduled, case))
    assert scheduled.peft_config["default"].init_seed is None
    # Every layer with a target module is active and stays so.
    layers = case.sort(case.layer_of(name) for name in lora_modules(plain))
    assert scheduled.active_layers == scheduled.preallocated_layers == layers
    assert scheduled.activate_layers(5) == layers
    assert trainable(plain) == trainable(scheduled)


# (family, config kwargs, module whose copy trains in every phase)
MODULES_TO_SAVE = [
    ("bert", dict(task_type="SEQ_CLS"), "classifier"),
    ("llama", dict(modules_to_save=["lm_head"]), "lm_head"),
]


@pytest.mark.parametrize("family,kwargs,module", MODULES_TO_SAVE, ids=[c[0] for c in MODULES_TO_SAVE])
def test_modules_to_save_train_in_every_phase(family, kwargs, module):
    case = [c for c in CASES if c.family == family][0]
    model = case.build(layer_schedule={0: [], 2: [case.raw_top]}, **kwargs)
    # What PEFT itself trains besides LoRA (PEFT 0.3.0 also leaves the original head trainable).
    extra = sorted(n for n in trainable(model) if "lora_" not in n)
    assert any("{}.modules_to_save.".format(module) in n for n in extra)
    assert model.activate_layers(0) == []
    assert trainable(model) == extra
    assert model.activate_layers(2) == [case.top]
    assert trainable(model) == sorted(extra + [n for n in lora_params(model) if case.layer_of(n) == case.top])


# --------------------------------------------------------------------------- bitwise invisibility


def _train(case, schedule, preallocate, epochs, steps=2, **config):
    """AdamW with weight decay over every requires_grad parameter, built right after get_peft_model."""
    torch.manual_seed(0)
    model = case.build(layer_schedule=schedule, preallocate_layers=preallocate, lora_dropout=0.1, **config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    losses, snapshots = [], [snapshot(model)]
    for epoch in range(epochs):
        model.activate_layers(epoch)
        for step in range(steps):
            value = loss(model, case, seed=100 * epoch + step)
            value.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(value.detach())
        snapshots.append(snapshot(model))
    return losses, snapshots  # snapshots[e + 1]: after epoch e


def _same(before, after, names):
    return [torch.equal(before[n], after[n]) for n in names]


# (case, extra config): every family, and BERT again with a classifier head (modules_to_save) that
# trains in every phase next to the scheduled adapters.
INVISIBILITY = [(case, {}) for case in CASES] + [(BY_FAMILY["bert"], {"task_type": "SEQ_CLS"})]


@pytest.mark.parametrize(
    "case,config", INVISIBILITY, ids=[repr(c) + (" with head" if kw else "") for c, kw in INVISIBILITY]
)
def test_preallocated_layers_are_bitwise_invisible_until_their_phase(case, config):
    top, low = [case.raw_top], [case.raw_low]
    losses_a, a = _train(case, {0: top, 3: low + top, 4: low}, [case.raw_spare] + low + top, epochs=6, **config)
    losses_b, b = _train(case, {0: top}, None, epochs=3, **config)
    names = sorted(a[0])
    top_names = [n for n in names if case.layer_of(n) == case.top]
    low_names = [n for n in names if case.layer_of(n) == case.low]
    spare_names = [n for n in names if case.layer_of(n) == case.spare]
    assert top_names and low_names and spare_names and sorted(b[0]) == top_names
    # Epochs 0-2: run A (with two more preallocated layers) is bitwise run B.
    assert len(losses_b) == 6
    for step, (x, y) in enumerate(zip(losses_a, losses_b)):
        assert torch.equal(x, y), step
    for epoch in range(4):
        assert all(_same(a[epoch], b[epoch], top_names)), epoch
    for epoch in range(3):  # top trains in each epoch of its phase
        assert not all(_same(a[epoch], a[epoch + 1], top_names)), epoch
    assert not any(_same(a[0], a[3], [n for n in top_names if "lora_B" in n]))  # top really trained
    assert all(_same(a[0], a[3], low_names + spare_names))  # untouched until their phase
    # Epoch 3: the low layer starts training.
    assert not all(_same(a[3], a[4], low_names))
    assert not any(_same(a[3], a[4], [n for n in low_names if "lora_B" in n]))
    # Epochs 4-5: top frozen (bitwise still under AdamW weight decay, epoch after epoch) while low trains.
    assert all(_same(a[4], a[5], top_names)) and all(_same(a[5], a[6], top_names))
    assert not all(_same(a[4], a[5], low_names)) and not all(_same(a[5], a[6], low_names))
    assert all(_same(a[0], a[6], spare_names))  # never active: never changes


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_seeded_init_depends_only_on_seed_and_module_name(case):
    def build(preallocate, base_seed=0, global_seed=0, **kwargs):
        base = case.base(seed=base_seed)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        config = case.config(layer_schedule={0: [case.raw_top]}, preallocate_layers=preallocate, **kwargs)
        model = get_peft_model(base, config)
        assert torch.equal(torch.get_rng_state(), before)  # no global RNG consumed
        return snapshot(model)

    alone = build([case.raw_top])
    names = sorted(alone)
    assert all(case.layer_of(n) == case.top for n in names)
    crowded = build([case.raw_spare, case.raw_low, case.raw_top])
    other_base_and_rng = build([case.raw_low, case.raw_top], base_seed=1, global_seed=7)
    for other in (crowded, other_base_and_rng):
        assert all(torch.equal(alone[n], other[n]) for n in names)
    # A is drawn (B is zero): another init_seed gives other A; distinct modules get distinct A.
    a_names = [n for n in names if "lora_A" in n]
    reseeded = build([case.raw_top], init_seed=1)
    assert all(not torch.equal(alone[n], reseeded[n]) for n in a_names)
    assert all(not torch.equal(alone[m], alone[n]) for m in a_names for n in a_names if m < n)
    assert all(not alone[n].any() for n in names if "lora_B" in n)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_unseeded_schedule_takes_and_records_the_initial_seed(case):
    snapshots = []
    for preallocate in ([case.raw_top], [case.raw_spare, case.raw_top]):
        base = case.base()
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        config = case.config(layer_schedule={0: [case.raw_top]}, init_seed=None, preallocate_layers=preallocate)
        model = get_peft_model(base, config)
        assert torch.equal(torch.get_rng_state(), before)
        assert model.peft_config["default"].init_seed == torch.initial_seed() == 1234
        snapshots.append(snapshot(model))
    assert all(torch.equal(value, snapshots[1][name]) for name, value in snapshots[0].items())


def test_scheduled_adapter_is_a_live_view_whose_verbs_drive_the_schedule():
    case = BY_FAMILY["bert"]
    model = case.build()
    tuner = model.base_model
    view = tuner.scheduled_adapter()
    assert isinstance(view, ScheduledAdapter) and (view.name, view.time) == ("default", None)
    assert (view.active_layers, view.preallocated_layers) == (case.first, case.later)
    model.activate_layers(2)
    assert (view.active_layers, view.ever_active_layers, view.time) == (case.later, case.later, 2)  # live reads
    config = model.peft_config["default"]
    view.set_schedule_position(5)
    assert config.schedule_position == 5 and view.active_layers == case.later  # the active set stays
    assert view.restore_layer_state(0) == case.first
    assert view.ever_active_layers == case.first and config.ever_active_layers == case.first
    assert not any(p.requires_grad for n, p in lora_params(model).items() if f".{case.low}." in n)
    view.register_all_for_optimizer()
    assert all(p.requires_grad for p in lora_params(model).values())
    # The drivers' verbs are the view's; the tuner's users see only the schedule's own API.
    assert not hasattr(tuner, "set_schedule_position") and not hasattr(model, "register_all_for_optimizer")
    with pytest.raises(ValueError, match="has no layer schedule"):
        tuner.scheduled_adapter("other")
