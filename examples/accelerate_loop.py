"""A layer schedule in a Hugging Face accelerate loop: ``LayerScheduler`` on the prepared model and optimizer.

Fine-tunes a small causal LM (LLaMA-style, built from a config: no download) on a toy next-token task with
a schedule in optimizer steps: layer 3 first, layer 2 joins at step 4 (warming up over 4 steps), and from
step 8 layer 1 trains alone.  One process, or several with DDP (on CPU: gloo)::

    python examples/accelerate_loop.py [--output-dir DIR]
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/accelerate_loop.py --output-dir DIR

(With accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts a single process: for several
CPU processes use torchrun, as above.)

What DDP needs:

1. ``get_peft_model`` and the optimizer (over ``LayerScheduler.param_groups(model)``) come before
   ``accelerator.prepare``: DDP registers the parameters that require grad when it wraps the model, and
   right after ``get_peft_model`` that is every preallocated LoRA parameter;
2. ``find_unused_parameters=True`` (``DistributedDataParallelKwargs``): frozen layers get no gradient;
3. ``LayerScheduler`` is built after ``prepare``, on the prepared model and optimizer (it finds the
   PeftModel inside the DDP wrapper); every rank computes the same active set from the step count.

Each rank writes ``DIR/rank<N>.json``: per optimizer step, the layers it trained, each layer's LR in it
(``sched.metrics()``), the loss, and a hash of each layer's LoRA weights after it.  Exit code 0 when each
layer's LoRA weights changed exactly in the steps it trained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import tiny_models  # examples/tiny_models.py, beside this script
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from peft import get_peft_model

from peft_layersched import LayerScheduler, ScheduledLoraConfig

SCHEDULE = {0: [3], 4: [2, 3], 8: [1]}  # optimizer steps
STEPS, BATCH_SIZE, LR = 12, 4, 1e-2


def build_model(seed: int = 0):
    """A 4-layer LLaMA-style causal LM with a 64-token vocabulary (examples/tiny_models.py)."""
    return tiny_models.llama(num_layers=4, seed=seed, vocab_size=64, num_attention_heads=4, num_key_value_heads=4)


def toy_sequences(count: int) -> list:
    """Each sequence counts up modulo the vocabulary from a random start."""
    starts = torch.randint(0, 64, (count, 1), generator=torch.Generator().manual_seed(0))
    ids = (starts + torch.arange(16)) % 64
    return [{"input_ids": row, "labels": row} for row in ids]


def lora_hashes(model) -> dict:
    """A short hash of each preallocated layer's LoRA weights (equal hashes: bitwise-equal weights)."""
    out = {}
    for layer, params in model.layer_parameters().items():
        digest = hashlib.sha256()
        for param in params:
            digest.update(param.detach().cpu().contiguous().numpy().tobytes())
        out[str(layer)] = digest.hexdigest()[:16]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="write rank<N>.json here")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    config = ScheduledLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layer_schedule=SCHEDULE, schedule_unit="step",
        init_seed=0, task_type="CAUSAL_LM",
    )
    model = get_peft_model(build_model(), config)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=LR, weight_decay=0.01)
    # accelerate steps the LR scheduler once per process at each optimizer step (each process sees
    # 1/num_processes of the data): count the decay in those steps.
    total = STEPS * accelerator.num_processes
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    loader = torch.utils.data.DataLoader(toy_sequences(STEPS * BATCH_SIZE * accelerator.num_processes), BATCH_SIZE)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    sched = LayerScheduler(model, optimizer, new_layer_warmup_steps=4, total_steps=STEPS)

    peft_model = accelerator.unwrap_model(model)
    steps = [{"step": 0, "hashes": lora_hashes(peft_model)}]
    model.train()
    for batch in loader:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = sched.metrics()  # the step just done: its layers and LRs
        lrs = {key.rsplit("/", 1)[1]: lr for key, lr in metrics.items() if key.startswith("layer_schedule/lr/")}
        steps.append({
            "step": sched.steps, "trained": sched.reported_layers(), "lr": lrs, "loss": float(loss.detach()),
            "hashes": lora_hashes(peft_model),
        })
        accelerator.print("step {:2d}  trained layers {}  LR {}  loss {:.4f}".format(
            sched.steps, steps[-1]["trained"], {k: round(v, 5) for k, v in lrs.items() if v}, steps[-1]["loss"]))
    sched.finish()

    wrong = []
    for before, after in zip(steps, steps[1:]):
        changed = [int(k) for k in after["hashes"] if after["hashes"][k] != before["hashes"][k]]
        if changed != after["trained"]:
            wrong.append("step {}: layers {} trained but LoRA changed in {}".format(after["step"], after["trained"],
                                                                                   changed))
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        record = {
            "world": accelerator.num_processes,
            "find_unused": getattr(model, "find_unused_parameters", None),
            "steps": steps,
            "wrong": wrong,
        }
        with open(os.path.join(args.output_dir, "rank{}.json".format(accelerator.process_index)), "w") as handle:
            json.dump(record, handle, indent=1)
    for line in wrong:
        print("rank {}: {}".format(accelerator.process_index, line), file=sys.stderr)
    if not wrong:
        accelerator.print("LoRA changed in exactly the scheduled layers at every step")
    # Leave together and shut the process group down: a rank that exits while gloo's threads still run
    # can abort ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
