"""One rank of a 2-process DDP Trainer run (gloo, CPU), launched by tests/test_distributed.py via torchrun.

    cd tests && python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m helpers.ddp_worker OUT_DIR epoch,step,adaptive,progressive,refuse

For each training kind writes OUT_DIR/<kind><rank>.json: per optimizer step, the active layers and a
hash of each layer's LoRA weights as they were after that step; for "refuse", the callback's error.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import Trainer, TrainerCallback

from peft_layersched import LayerScheduleCallback

from helpers.leave import leave_together
from helpers.snapshots import layer_hashes
from helpers.toy_training import ToyClassification, cpu_flag, scheduled_bert, train, training_args

LAYERS = 4
SCHEDULES = {
    # layer 3 trains epochs 0-1 and is frozen after; layer 1 joins at epoch 2
    "epoch": ({0: [3], 2: [1]}, "epoch"),
    # optimizer-step phases, switching inside epochs
    "step": ({0: [3], 3: [1, 3], 6: [2]}, "step"),
    # chosen from the gradient norms both ranks measure on their own halves of the data
    "adaptive": ({"type": "adaptive", "k": 1, "every": 2, "policy": "sample", "explore": 0.2}, "step"),
    # seeded draws with a chance rising to 1 at half the run (its length from the Trainer's max_steps)
    "progressive": ({"type": "progressive", "start": 0.2, "full_at": 0.5, "seed": 5}, "step"),
}


class Recorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.steps.append({"step": 0, "active": model.active_layers, "hashes": layer_hashes(model)})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # Listed after LayerScheduleCallback: `active` is the set for the next step.
        self.steps.append({"step": state.global_step, "active": model.active_layers, "hashes": layer_hashes(model)})


def refuse(out_dir):
    """ddp_find_unused_parameters=False cannot work with a schedule: the callback must say so."""
    model = scheduled_bert({0: [3]}, num_layers=LAYERS)
    args = training_args(out_dir, ddp_find_unused_parameters=False, ddp_backend="gloo", **cpu_flag())
    try:
        Trainer(model=model, args=args, train_dataset=ToyClassification(n=32), callbacks=[LayerScheduleCallback()])
    except ValueError as error:
        return str(error)
    return None


def main(out_dir, kind):
    if kind == "refuse":
        message = refuse(out_dir)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(os.path.join(out_dir, "refuse{}.json".format(rank)), "w") as handle:
            json.dump({"message": message}, handle)
        return
    schedule, unit = SCHEDULES[kind]
    model = scheduled_bert(schedule, unit=unit, num_layers=LAYERS)
    recorder = Recorder()
    trainer = train(
        model,
        out_dir,
        callbacks=[LayerScheduleCallback(), recorder],
        dataset=ToyClassification(n=32),
        ddp_backend="gloo",
        **cpu_flag(),
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    find_unused = getattr(trainer.model_wrapped, "find_unused_parameters", None)
    adaptive = [e for e in trainer.state.log_history if "layer_schedule_adaptive" in e]
    decisions = adaptive[0]["layer_schedule_adaptive"]["decisions"] if adaptive else None
    with open(os.path.join(out_dir, "{}{}.json".format(kind, rank)), "w") as handle:
        json.dump({"world": world, "find_unused": find_unused, "steps": recorder.steps, "decisions": decisions},
                  handle)


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        main(sys.argv[1], name)
    leave_together()
