"""Files written by a release, kept in tests/fixtures/release-<version>/ so later code must read them.

Run it to write a new release's set: ``python tests/helpers/release_fixtures.py tests/fixtures/release-X``.
Each set holds, for a Trainer run and a plain loop, a checkpoint taken mid-run and the LoRA weights the
uninterrupted run ended with; and a saved adapter. ``versions.json`` names the stack that wrote them: a resume
is compared bitwise only on that stack (another torch may round differently).
"""

from __future__ import annotations

import json
import os
import sys

import torch

TRAINER_SCHEDULES = {
    # milestones with warm-up: the schedule's switches live in the Trainer's state
    "milestones": {0: [3], 2: [2, 3], 4: [1, 3]},
    # adaptive: the decisions and the signal's state live there too
    "adaptive": {"type": "adaptive", "k": 1, "every": 2, "policy": "top", "explore": 0.0, "signal": "update"},
}
TRAINER_STEPS, TRAINER_SAVE = 8, 4
# a Trainer checkpoint's files that a resume reads (training_args.bin is a pickle of one transformers version)
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json")


def versions():
    import peft
    import transformers

    import peft_layersched

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "peft": peft.__version__, "peft_layersched": peft_layersched.__version__}


def trainer_run(kind, out, resume=None, save=False):
    """The Trainer run of ``kind`` (8 steps, warm-up 2), saving at step 4 when ``save``; returns the model."""
    from peft_layersched import LayerScheduleCallback

    from helpers.toy_training import ToyClassification, scheduled_bert, train

    torch.manual_seed(0)
    model = scheduled_bert(TRAINER_SCHEDULES[kind], unit="step", num_layers=4, dropout=0.0)
    options = {"save_strategy": "steps", "save_steps": TRAINER_SAVE} if save else {}
    train(model, out, callbacks=[LayerScheduleCallback(new_layer_warmup_steps=2)],
          dataset=ToyClassification(n=32), resume=resume, max_steps=TRAINER_STEPS, **options)
    return model


def write(root):
    import shutil

    from safetensors.torch import save_file

    from helpers import plain_resume
    from helpers.snapshots import lora

    os.makedirs(root, exist_ok=True)
    scratch = os.path.join(root, "_scratch")
    for kind in TRAINER_SCHEDULES:
        model = trainer_run(kind, scratch, save=True)
        folder = os.path.join(root, "trainer-" + kind)
        os.makedirs(folder, exist_ok=True)
        checkpoint = os.path.join(scratch, "checkpoint-{}".format(TRAINER_SAVE))
        for name in CHECKPOINT_FILES:
            shutil.copy(os.path.join(checkpoint, name), os.path.join(folder, name))
        save_file(lora(model), os.path.join(folder, "expected_lora.safetensors"))
        if kind == "adaptive":
            model.save_pretrained(os.path.join(root, "adapter"))
        shutil.rmtree(scratch)
    for kind in ("fixed", "update"):
        run = plain_resume.build(kind)
        run = run + (plain_resume.layer_scheduler(run[1], run[2]),)
        plain_resume.train(run, 0, plain_resume.RESUME_AT)
        folder = os.path.join(root, "plain-" + kind)
        os.makedirs(folder, exist_ok=True)
        plain_resume.save(run, os.path.join(folder, "checkpoint.pt"))
        plain_resume.train(run, plain_resume.RESUME_AT, plain_resume.STEPS)
        save_file(lora(run[0]), os.path.join(folder, "expected_lora.safetensors"))
    with open(os.path.join(root, "versions.json"), "w") as handle:
        json.dump(versions(), handle, indent=2, sort_keys=True)
        handle.write("\n")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    write(sys.argv[1])
