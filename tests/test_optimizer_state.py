"""``LayerScheduleCallback(frozen_optimizer_state=...)``: what the optimizer holds for frozen layers, real Trainer runs.

A rotating step schedule over four layers (every layer freezes and rejoins): with ``"drop"`` the optimizer
holds state for the active layers only, trains exactly like ``reactivated_state="reset"`` and resumes
bitwise; ``"offload"`` trains exactly like ``"keep"`` and resumes bitwise.
"""

from __future__ import annotations

import os

import pytest
from transformers import TrainerCallback

from peft_layersched import LayerScheduleCallback

from helpers.snapshots import lora, same
from helpers.toy_training import scheduled_bert, train, training_args

# 16 samples / batch 4 = 4 optimizer steps per epoch; 3 epochs = 12 steps; a switch every 2 steps.
ROTATION = {0: [0], 2: [1], 4: [2], 6: [3], 8: [0], 10: [1, 3]}
LAYERS = 4


def _model():
    return scheduled_bert(ROTATION, unit="step", num_layers=LAYERS)


class StateProbe(TrainerCallback):
    """After each optimizer step (before our switch): the layers whose LoRA parameters have optimizer state."""

    def __init__(self, model):
        self.layer_of = {
            id(p): layer for layer, ps in model.base_model.layer_parameters().items() for p in ps
        }
        self.with_state = {}
        self.head_bytes = {}
        self.active = {}
        self.bytes_logged = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)
        held = {self.layer_of[id(p)] for p, entries in inner.state.items() if id(p) in self.layer_of and entries}
        self.with_state[state.global_step] = held
        # the head (modules_to_save): whatever non-LoRA parameters the optimizer keeps state for
        self.head_bytes[state.global_step] = _adam_bytes(p for p in inner.state if id(p) not in self.layer_of)
        self.active[state.global_step] = set(model.base_model.active_layers)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "layer_schedule/optimizer_state_bytes" in logs:
            self.bytes_logged[state.global_step] = logs["layer_schedule/optimizer_state_bytes"]


def _run(out, policy, resume=None, **callback):
    model = _model()
    probe = StateProbe(model)
    # the probe runs first: it sees each step's state before the switch to the next step's layers, as the
    # step's log record reports it
    callbacks = [probe, LayerScheduleCallback(frozen_optimizer_state=policy, **callback)]
    trainer = train(
        model, out, callbacks=callbacks, resume=resume, num_train_epochs=3, save_strategy="epoch",
        report_to="none",
    )
    return model, probe, trainer


def _adam_bytes(params):
    return sum(8 * p.numel() for p in params)  # exp_avg + exp_avg_sq, float32


def test_drop_keeps_state_of_active_layers_only_and_trains_like_reset(tmp_path):
    dropped, probe, trainer = _run(tmp_path / "drop", "drop")
    for step, held in probe.with_state.items():
        assert held <= probe.active[step], (step, held, probe.active[step])
        if step % 2:  # inside a phase: every active layer has stepped
            assert held == probe.active[step], step
    layers = dropped.base_model.layer_parameters()
    lora_at = {s: _adam_bytes(p for layer in probe.with_state[s] for p in layers[layer]) for s in probe.with_state}
    logged = {s: b for s, b in probe.bytes_logged.items() if s in lora_at}
    assert len(logged) == 12 and all(b == lora_at[s] + probe.head_bytes[s] for s, b in logged.items()), logged
    assert min(probe.head_bytes.values()) > 0

    kept, keep_probe, _ = _run(tmp_path / "keep", "keep")
    assert keep_probe.with_state[12] == {0, 1, 2, 3}  # keep: every layer the rotation visited
    assert not same(lora(kept), lora(dropped))
    reset, _, _ = _run(tmp_path / "reset", "keep", reactivated_state="reset")
    assert same(lora(reset), lora(dropped))


def test_offload_trains_like_keep(tmp_path):
    kept, _, _ = _run(tmp_path / "keep", "keep")
    offloaded, probe, _ = _run(tmp_path / "offload", "offload")
    assert same(lora(kept), lora(offloaded))
    # offloaded state stays in the optimizer (as CPU tensors: on a CPU-only model nothing moves)
    assert probe.with_state[12] == {0, 1, 2, 3}


@pytest.mark.parametrize("policy", ["drop", "offload"])
def test_resume_after_a_switch_is_bitwise_identical(tmp_path, policy):
    straight, _, _ = _run(tmp_path / "straight", policy)
    _run(tmp_path / "first", policy)
    checkpoint = os.path.join(str(tmp_path / "first"), "checkpoint-8")  # saved right after the switch at step 8
    assert os.path.isdir(checkpoint)
    resumed, probe, _ = _run(tmp_path / "first", policy, resume=checkpoint)
    assert min(probe.with_state) == 9
    assert same(lora(straight), lora(resumed))


def test_bad_policies_are_refused_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"frozen_optimizer_state='forget'.*'keep', 'drop', 'offload'"):
        LayerScheduleCallback(frozen_optimizer_state="forget")
    with pytest.raises(ValueError, match=r"'drop' frees.*reactivated_state='keep'.*'offload'"):
        LayerScheduleCallback(frozen_optimizer_state="drop", reactivated_state="keep")
    assert LayerScheduleCallback(frozen_optimizer_state="drop").reactivated_state == "reset"
    model = _model()
    args = training_args(tmp_path)  # built before the variables: transformers reads them at construction
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"not available under DeepSpeed.*offload_optimizer"):
        LayerScheduleCallback(frozen_optimizer_state="offload").on_init_end(args, None, None, model=model)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "true")
    with pytest.raises(ValueError, match=r"not supported under FSDP.*'keep'"):
        LayerScheduleCallback(frozen_optimizer_state="drop").on_init_end(args, None, None, model=model)
