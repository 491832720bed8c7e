"""One rank of a 2-process Lightning DDP fit (gloo, CPU), launched by tests/test_lightning.py via torchrun.

    cd tests && python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m helpers.lightning_worker OUT_DIR step,refuse

Lightning sees torchrun's variables (its TorchElastic environment) and starts no processes of its own.
For "step" writes OUT_DIR/step<rank>.json: per optimizer step, the layers that train next and a hash of
each layer's LoRA weights after that step; for "refuse", the error strategy="ddp" (DDP without
find_unused_parameters) gets.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from peft_layersched.lightning import LayerScheduleFinetuning

from helpers import lightning_training as lt
from helpers.leave import leave_together


def fit(out_dir, strategy, callbacks):
    model = lt.scheduled_bert({0: [3], 3: [1]}, "step")
    run = lt.trainer(
        tempfile.mkdtemp(dir=out_dir), [LayerScheduleFinetuning()] + callbacks, accelerator="cpu", devices=2,
        strategy=strategy, max_steps=6,
    )
    run.fit(lt.ScheduledModule(model), lt.loader(n=16))  # 2 batches per rank and epoch
    return run


def main(out_dir, kind):
    rank = int(os.environ.get("RANK", "0"))
    if kind == "refuse":
        try:
            fit(out_dir, "ddp", [])
            result = {"message": None}
        except ValueError as error:
            result = {"message": str(error)}
    else:
        recorder = lt.Recorder()
        fit(out_dir, "ddp_find_unused_parameters_true", [recorder])
        result = {"world": torch.distributed.get_world_size(), "steps": recorder.steps}
    with open(os.path.join(out_dir, "{}{}.json".format(kind, rank)), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        main(sys.argv[1], name)
    leave_together()
