"""Backward stops at the lowest active layer, and the gradients stay exact.

Gradients with gradient checkpointing (reentrant and non-reentrant) equal plain autograd's, phase after
phase, including phases whose lowest active layer is 0 and switches down to a lower layer; frozen layers
below the lowest active one are neither recomputed nor backpropagated through, and keep no activations;
the model's input-require-grads hooks come off while the stop is in place and come back when it goes.
Step times are measured by ``benchmarks/layer_schedule_bench.py``; nothing here times anything.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_layersched import ScheduledLoraConfig, _compat, backward_stop

from helpers import tiny_models

# family -> (layer stack paths, schedule, expected stop at t = 0, 1, ...: lowest active layer or None)
PHASES = {
    "bert": (
        ["bert.encoder.layer"],
        {0: [5], 1: [2, 5], 2: [0], 3: [1, 5], 4: []},
        [("bert.encoder.layer", 5), ("bert.encoder.layer", 2), ("bert.encoder.layer", 0),
         ("bert.encoder.layer", 1), "above-stacks"],
    ),
    "llama": (
        ["model.layers"],
        {0: [5], 1: [1], 2: [0, 3], 3: [2]},
        [("model.layers", 5), ("model.layers", 1), ("model.layers", 0), ("model.layers", 2)],
    ),
    "gpt2": (
        ["transformer.h"],
        {0: [5], 1: [0], 2: [3]},
        [("transformer.h", 5), ("transformer.h", 0), ("transformer.h", 3)],
    ),
    "t5": (
        ["encoder.block", "decoder.block"],
        {0: ["decoder.1"], 1: ["decoder.0"], 2: ["encoder.1", "decoder.1"], 3: ["encoder.2"]},
        [("decoder.block", 1), ("decoder.block", 0), None, ("encoder.block", 2)],
    ),
}

# (family, checkpointing kind: "re" reentrant / "nr" non-reentrant / None, enabled before/after get_peft_model)
GC_CASES = [
    ("bert", "re", "before"),
    ("bert", "nr", "before"),
    ("bert", "re", "after"),
    ("bert", None, None),
    ("llama", "re", "before"),
    ("llama", "nr", "after"),
    ("gpt2", "re", "before"),
    ("t5", "re", "before"),
    ("t5", "nr", "before"),
]


def _base(family):
    if family == "t5":
        return tiny_models.t5()
    return tiny_models.BUILDERS[family](num_layers=6)


def _enable_gc(base, kind):
    if not _compat.enable_gradient_checkpointing(base, reentrant=(kind == "re")):
        pytest.skip("this transformers has only reentrant gradient checkpointing")
    if not _compat.input_require_grads_hooks(base):
        base.enable_input_require_grads()  # the vanilla recipe (transformers 5.x registers it itself)


def _build(family, kind=None, when=None, **config):
    base = _base(family)
    if kind is not None and when == "before":
        _enable_gc(base, kind)
    kwargs = dict(
        r=4,
        target_modules=tiny_models.TARGETS[family],
        layer_schedule=PHASES[family][1],
        init_seed=0,
        init_lora_weights=False,  # B != 0: every adapter's gradient depends on the layers around it
        lora_dropout=0.1,
    )
    if family == "bert":
        kwargs["task_type"] = "SEQ_CLS"  # a trainable classifier above the stack (modules_to_save)
    kwargs.update(config)
    model = get_peft_model(base, ScheduledLoraConfig(**kwargs))
    if kind is not None and when == "after":
        _enable_gc(model.get_base_model(), kind)  # as Trainer 4.x does, after the PeftModel exists
    model.train()
    return model


def _loss(model, family, seed):
    torch.manual_seed(seed)  # the same dropout masks with and without checkpointing
    return model(**tiny_models.example_inputs(family, batch=2, seq=7)).logits.float().pow(2).mean()


def _grads(model, family, seed):
    _loss(model, family, seed).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _layers(model, path):
    return list(model.get_base_model().get_submodule(path))


def _where(model):
    stop = backward_stop.backward_stop(model.get_base_model())
    return None if stop is None else stop.where


@pytest.mark.parametrize("family,kind,when", GC_CASES)
def test_gradients_equal_plain_autograd_phase_after_phase(family, kind, when):
    reference = _build(family)
    model = _build(family, kind, when)
    for t, expected in enumerate(PHASES[family][2]):
        reference.activate_layers(t)
        model.activate_layers(t)
        assert _where(model) == expected, t
        want, got = _grads(reference, family, seed=t), _grads(model, family, seed=t)
        assert sorted(got) == sorted(want), t
        assert any("lora_" in name for name in got) == bool(PHASES[family][1][t]), t
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family,kind,when", [case for case in GC_CASES if case[0] != "t5"])
def test_backward_never_enters_frozen_layers_below_the_lowest_active_one(family, kind, when):
    model = _build(family, kind, when)
    path = PHASES[family][0][0]
    layers = _layers(model, path)
    state = {"backward": False}
    recomputed = [0] * len(layers)
    outputs = {}

    def count(i):
        def hook(module, args, output):
            if state["backward"]:
                recomputed[i] += 1  # a checkpointed layer runs again in backward
        return hook

    def keep(i):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            if not state["backward"] and tensor.requires_grad:
                outputs[i] = tensor
                tensor.register_hook(lambda grad: outputs.__setitem__(i, "got grad"))
        return hook

    for i, layer in enumerate(layers):
        next(iter(layer.children())).register_forward_hook(count(i))  # runs inside a checkpoint
        layer.register_forward_hook(keep(i))
    for t, expected in enumerate(PHASES[family][2]):
        if not isinstance(expected, tuple):
            continue
        lo = expected[1]
        model.activate_layers(t)
        state["backward"], outputs = False, {}
        recomputed[:] = [0] * len(layers)
        loss = _loss(model, family, seed=t)
        state["backward"] = True
        loss.backward()
        model.zero_grad(set_to_none=True)
        # transformers < 4.52 with reentrant checkpointing and lo == 1: the leaf is the embedding output,
        # so layer 0 runs in backward too (for its input gradient only).
        stop = backward_stop.backward_stop(model.get_base_model())
        floor = 0 if kind == "re" and stop.leaf == "input-embeddings" else lo
        assert recomputed[:floor] == [0] * floor, (t, recomputed)
        if kind is not None:
            assert recomputed[floor:] == [1] * (len(layers) - floor), (t, recomputed)
        # Below lo - 1 nothing requires grad; lo - 1's output is at most a leaf (a grad arrives, none flows).
        assert not [i for i in outputs if i < lo - 1], (t, sorted(outputs))
        if lo - 1 in outputs:
            assert outputs[lo - 1] == "got grad" or outputs[lo - 1].grad_fn is None


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_frozen_layers_below_keep_no_activations(family):
    base = _base(family)
    base.enable_input_require_grads()  # what PEFT registers when checkpointing was on: full depth
    model = get_peft_model(base, ScheduledLoraConfig(r=4, target_modules=tiny_models.TARGETS[family],
                                                     layer_schedule={0: [4]}, init_seed=0))
    model.activate_layers(0)
    model.train()
    layers = _layers(model, PHASES[family][0][0])
    current = [None]
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: current.__setitem__(0, i))
        layer.register_forward_hook(lambda module, args, output: current.__setitem__(0, None))

    def saved_by_layer():
        saved = []

        def pack(tensor):
            saved.append(current[0])
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            _loss(model, family, seed=0).backward()
        model.zero_grad(set_to_none=True)
        return {i for i in saved if i is not None}

    assert saved_by_layer() == set(range(4, len(layers)))
    backward_stop.remove(model.get_base_model())  # the hook is back: every layer keeps activations
    assert saved_by_layer() == set(range(len(layers)))


def test_input_require_grads_hooks_come_off_and_back():
    model = _build("bert", "re", "before")
    base = model.get_base_model()
    model.activate_layers(0)
    assert _compat.input_require_grads_hooks(base) == []
    before = len(backward_stop.backward_stop(base)._stashed)
    assert before >= 1
    # Trainable input embeddings: the gradient must reach the bottom, the model's own hooks return.
    embeddings = base.get_input_embeddings()
    embeddings.weight.requires_grad_(True)
    model.activate_layers(0)
    assert _where(model) is None
    assert len(_compat.input_require_grads_hooks(base)) == before
    embeddings.weight.requires_grad_(False)
    model.activate_layers(0)
    assert _compat.input_require_grads_hooks(base) == []
    merged = model.merge_and_unload()
    assert len(_compat.input_require_grads_hooks(merged)) == before
    assert backward_stop.backward_stop(merged) is None
    assert not [m for m in merged.modules() if any(
        type(h).__module__ == backward_stop.__name__ for h in list(m._forward_hooks.values())
        + list(m._forward_pre_hooks.values()))]


@pytest.mark.parametrize("kind", ["re", "nr"])
def test_trainable_embeddings_keep_full_depth_and_exact_gradients(kind):
    reference = _build("bert", modules_to_save=["word_embeddings"])
    model = _build("bert", kind, "before", modules_to_save=["word_embeddings"])
    for t in (0, 1):
        reference.activate_layers(t)
        model.activate_layers(t)
        assert _where(model) is None
        want, got = _grads(reference, "bert", seed=t), _grads(model, "bert", seed=t)
        assert sorted(got) == sorted(want) and any("word_embeddings" in n for n in got)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_flags_are_back_after_every_forward():
    model = _build("bert", "re", "before")
    base = model.get_base_model()
    flags = {name: m.gradient_checkpointing for name, m in base.named_modules() if hasattr(m, "gradient_checkpointing")}
    for t in range(4):
        model.activate_layers(t)
        _loss(model, "bert", seed=t).backward()
        now = {n: m.gradient_checkpointing for n, m in base.named_modules() if hasattr(m, "gradient_checkpointing")}
        assert now == flags, t
    model.eval()
    with torch.no_grad():
        assert not _loss(model, "bert", seed=0).requires_grad


def test_optimizer_holds_state_only_for_ever_active_parameters():
    model = _build("bert")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layers = model.layer_parameters()
    for t, ever in ((0, {5}), (1, {2, 5})):
        model.activate_layers(t)
        for step in range(2):
            _loss(model, "bert", seed=step).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with_state = {id(p) for p, s in optimizer.state.items() if s}
        for layer, params in layers.items():
            assert all((id(p) in with_state) == (layer in ever) for p in params), (t, layer)


def test_trainer_with_gradient_checkpointing_trains_like_without(tmp_path):
    """``TrainingArguments(gradient_checkpointing=True)`` the way users turn it on (the Trainer enables it on
    the PeftModel, with whatever hooks this transformers/PEFT add): the schedule trains each layer in its
    phase, backward stops at the lowest active layer, and the weights match a run without checkpointing."""
    from helpers.toy_training import scheduled_bert, train

    runs = {}
    for checkpointing_on in (False, True):
        model = scheduled_bert({0: [5], 2: [2, 5]}, num_layers=6)
        initial = {layer: [p.detach().clone() for p in ps] for layer, ps in model.base_model.layer_parameters().items()}
        train(model, tmp_path / str(checkpointing_on), num_train_epochs=3, gradient_checkpointing=checkpointing_on)
        final = {layer: [p.detach().clone() for p in ps] for layer, ps in model.base_model.layer_parameters().items()}
        assert all(any(not torch.equal(a, b) for a, b in zip(initial[k], final[k])) for k in (2, 5))
        stop = backward_stop.backward_stop(model.get_base_model())
        assert stop is not None and stop.where == ("bert.encoder.layer", 2)
        runs[checkpointing_on] = final
    for layer in (2, 5):
        for without, with_checkpointing in zip(runs[False][layer], runs[True][layer]):
            torch.testing.assert_close(with_checkpointing, without, rtol=1e-4, atol=1e-6)
