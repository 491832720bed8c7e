"""The schedule reaches experiment trackers: a real Trainer run with report_to=["tensorboard"], the event
file read back."""

from __future__ import annotations

import glob
import importlib.util

import pytest

from peft_layersched import LayerScheduleCallback

from helpers.toy_training import ToyClassification, scheduled_bert, train

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed in this env (the matrix installs it in peft0212-tf5)",
)


def read_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for path in glob.glob(f"{folder}/**/events.out.tfevents.*", recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in events.Scalars(tag)})
    return scalars


def test_tensorboard_sees_active_layers_trainable_params_and_layer_lrs(tmp_path):
    # 4 steps per epoch; layer 11 trains epochs 0-1, then layer 10 joins at half the LR; logged every 3 steps.
    model = scheduled_bert({0: [11], 2: [10, 11]})
    train(model, tmp_path, callbacks=[LayerScheduleCallback(new_layer_lr_scale=0.5)], dataset=ToyClassification(),
          report_to=["tensorboard"], logging_steps=3)
    scalars = read_scalars(tmp_path)  # the event file lands under output_dir (runs/ or logging_dir)
    active = scalars["train/layer_schedule/active_layers"]
    # every logging step; the switch at step 8 (epoch 2) shows from the next one on
    assert set(active) == {3, 6, 9, 12, 15}
    assert [active[t] for t in (3, 6)] == [1.0, 1.0] and [active[t] for t in (9, 12, 15)] == [2.0, 2.0, 2.0]
    assert scalars["train/layer_schedule/lowest_active"][3] == 11.0
    assert scalars["train/layer_schedule/lowest_active"][12] == 10.0
    assert scalars["train/layer_schedule/highest_active"][12] == 11.0
    assert scalars["train/layer_schedule/trainable_params"][12] > scalars["train/layer_schedule/trainable_params"][3]
    assert scalars["train/layer_schedule/active/10"][3] == 0.0 and scalars["train/layer_schedule/active/10"][12] == 1.0
    lr_top, lr_new = scalars["train/layer_schedule/lr/11"], scalars["train/layer_schedule/lr/10"]
    assert lr_new[3] == 0.0 and lr_top[3] > 0
    assert lr_new[12] == pytest.approx(0.5 * lr_top[12], rel=1e-6)
