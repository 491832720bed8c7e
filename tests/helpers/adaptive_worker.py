"""A Trainer run with an adaptive schedule, in its own process (tests/test_adaptive.py):

    python adaptive_worker.py OUT_DIR whole|kill-after-8|resume

``kill-after-8`` kills its own process with SIGKILL right after the checkpoint of step 8 is written (no
handler, no cleanup runs); ``resume`` goes on from OUT_DIR/checkpoint-8.  ``whole`` and ``resume`` write
OUT_DIR/result.json: the decision log and a hash of each layer's LoRA weights at the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from peft_layersched import LayerScheduleCallback  # noqa: E402

from helpers.leave import leave_together
from helpers.snapshots import layer_hashes  # noqa: E402
from helpers.toy_training import scheduled_bert, train  # noqa: E402

SPEC = {"type": "adaptive", "k": 2, "every": 2, "policy": "sample", "explore": 0.1, "seed": 3}


class KillAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(out, kind):
    torch.set_num_threads(1)
    model = scheduled_bert(SPEC, unit="step", num_layers=4, dropout=0.1)
    callbacks = [LayerScheduleCallback()] + ([KillAfter(8)] if kind == "kill-after-8" else [])
    trainer = train(model, out, callbacks=callbacks, max_steps=12, save_strategy="steps", save_steps=4,
                    logging_steps=100, resume=os.path.join(out, "checkpoint-8") if kind == "resume" else None)
    entry = [e for e in trainer.state.log_history if "layer_schedule_adaptive" in e][0]
    with open(os.path.join(out, "result.json"), "w") as handle:
        json.dump({"decisions": entry["layer_schedule_adaptive"]["decisions"], "hashes": layer_hashes(model)}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    leave_together()
