"""A layer schedule in a plain PyTorch training loop: no Trainer, no callback, a ``LayerScheduler``.

Fine-tunes a small causal LM (LLaMA-style, built from a config: no download) on a toy next-token task
with LoRA on the top layer first, then the top two, then a lower layer instead (epoch unit).  The loop:

1. build the optimizer right after ``get_peft_model``, over ``LayerScheduler.param_groups(model)``: it
   holds every preallocated layer (also those that join later), each in a param group of its own;
2. ``LayerScheduler(model, optimizer, ...)`` applies the first epoch's layers; after each optimizer step
   (and ``lr_scheduler.step()``) call ``sched.step()``, after each epoch ``sched.epoch_end()``;
3. zero grads with ``set_to_none=True``: frozen layers keep ``grad=None``, so AdamW skips them.

Layers that join later warm up over ``new_layer_warmup_steps`` steps; a layer that is frozen loses its
optimizer state (``frozen_optimizer_state="drop"``).  The run is done twice: straight through, and saved
at step ``--resume-at`` (adapter, optimizer, LR scheduler, layer scheduler, RNG) and resumed by a model,
optimizer and schedulers built from scratch.

    python examples/plain_torch_loop.py [--epochs 4] [--resume-at 20] [--output-dir DIR]

It prints one line per epoch (active layers, the LR of each active layer's first step, mean loss) and
checks that each layer's LoRA weights changed exactly in the epochs it was scheduled, that the frozen
layer's optimizer state was dropped, and that the resumed run ends bitwise where the uninterrupted one
does.  Exit code 0 when all hold.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import tiny_models  # examples/tiny_models.py, beside this script
import torch
from peft import PeftModel, get_peft_model

from peft_layersched import LayerScheduler, ScheduledLoraConfig

SCHEDULE = {0: [-1], 1: [-2, -1], 3: [1]}  # layer 3 (top), then 2 and 3, then layer 1 alone


def build_model(seed: int = 0):
    """A 4-layer LLaMA-style causal LM with a 64-token vocabulary (examples/tiny_models.py)."""
    return tiny_models.llama(num_layers=4, seed=seed, vocab_size=64, num_attention_heads=4, num_key_value_heads=4)


def batch(step: int) -> dict:
    """A toy task: each sequence counts up modulo the vocabulary from a random start (one seed a step, so
    a resumed run sees the same batches)."""
    start = torch.randint(0, 64, (8, 1), generator=torch.Generator().manual_seed(step))
    ids = (start + torch.arange(16)) % 64
    return {"input_ids": ids, "labels": ids}


def build(total_steps: int, adapter_dir: str = None):
    """Model, optimizer and LR scheduler, as a fresh process builds them (from a saved adapter: resume)."""
    if adapter_dir is None:
        config = ScheduledLoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.1,
            target_modules=["q_proj", "v_proj"],
            layer_schedule=SCHEDULE,
            init_seed=0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(build_model(), config)
    else:
        model = PeftModel.from_pretrained(build_model(), adapter_dir, is_trainable=True)
    # Now, while every preallocated LoRA parameter requires grad (also after from_pretrained): one param
    # group per layer, in the same order each time, so the saved optimizer state maps back onto them.
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2, weight_decay=0.1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total_steps)
    return model, optimizer, lr_scheduler


def layer_scheduler(model, optimizer, epochs: int, state: dict = None) -> LayerScheduler:
    return LayerScheduler(
        model, optimizer, new_layer_warmup_steps=4, frozen_optimizer_state="drop", total_epochs=epochs,
        state_dict=state,
    )


def lora_snapshot(model) -> dict:
    """Each preallocated layer's LoRA tensors, copied (``layer_parameters()`` groups them by layer)."""
    return {layer: [p.detach().clone() for p in params] for layer, params in model.layer_parameters().items()}


class EpochReport(object):
    """Per epoch: the active layers, the LR each got at the epoch's first step, the mean loss, and the
    layers whose LoRA weights changed."""

    def __init__(self) -> None:
        self.epochs = []

    def begin(self, model) -> None:
        self.before, self.losses, self.lrs = lora_snapshot(model), [], None

    def step(self, sched: LayerScheduler, loss: float) -> None:
        self.losses.append(loss)
        if self.lrs is None:  # metrics(): the LRs of the step just done (a joining layer's warm-up shows)
            metrics = sched.metrics()
            self.lrs = {layer: metrics["layer_schedule/lr/{}".format(layer)] for layer in sched.active_layers}

    def end(self, model, sched: LayerScheduler) -> None:
        after = lora_snapshot(model)
        changed = [k for k in after if any(not torch.equal(a, b) for a, b in zip(self.before[k], after[k]))]
        self.epochs.append((sched.epoch, sched.active_layers, self.lrs, sum(self.losses) / len(self.losses), changed))


def train(model, optimizer, lr_scheduler, sched, stop: int, steps_per_epoch: int, report: EpochReport = None):
    """Train until ``sched.steps`` (the optimizer steps done, part of its saved state) is ``stop``."""
    model.train()
    while sched.steps < stop:
        if report is not None and sched.steps % steps_per_epoch == 0:
            report.begin(model)
        loss = model(**batch(sched.steps)).loss
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if report is not None:
            report.step(sched, float(loss.detach()))
        if sched.steps % steps_per_epoch == 0:
            if report is not None:
                report.end(model, sched)
            sched.epoch_end()


def save(folder, model, optimizer, lr_scheduler, sched) -> None:
    model.save_pretrained(folder)
    state = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "layer_scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),  # LoRA dropout draws from it
    }
    torch.save(state, os.path.join(folder, "training_state.pt"))


def resume(folder, total_steps: int, epochs: int):
    model, optimizer, lr_scheduler = build(total_steps, adapter_dir=folder)
    state = torch.load(os.path.join(folder, "training_state.pt"))
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"])
    # state_dict=: the layers, LR factors and warm-ups where the saved run had them
    sched = layer_scheduler(model, optimizer, epochs, state=state["layer_scheduler"])
    return model, optimizer, lr_scheduler, sched


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=8)
    parser.add_argument("--resume-at", type=int, default=20, help="optimizer step at which to save and resume")
    parser.add_argument("--output-dir", default=None, help="where to save the checkpoint (default: a temporary one)")
    args = parser.parse_args(argv)
    total = args.epochs * args.steps_per_epoch
    if not 0 < args.resume_at < total:
        parser.error("--resume-at must be a step inside the run (1..{}), got {}".format(total - 1, args.resume_at))
    wrong = []

    # The uninterrupted run.
    model, optimizer, lr_scheduler = build(total)
    print("adapters preallocated on layers", model.preallocated_layers)
    sched = layer_scheduler(model, optimizer, args.epochs)
    report = EpochReport()
    train(model, optimizer, lr_scheduler, sched, total, args.steps_per_epoch, report)
    sched.finish()
    for epoch, active, lrs, loss, changed in report.epochs:
        print("epoch {}  active layers {}  first-step LR {}  mean loss {:.4f}  LoRA changed in layers {}".format(
            epoch, active, {layer: round(lr, 5) for layer, lr in lrs.items()}, loss, changed))
        if active != changed:
            wrong.append("epoch {}: scheduled {} but LoRA changed in {}".format(epoch, active, changed))
    frozen = [layer for layer in model.preallocated_layers if layer not in sched.active_layers]
    kept = [layer for layer in frozen if any(p in optimizer.state for p in model.layer_parameters()[layer])]
    print("optimizer state of the frozen layers {}: {}".format(frozen, "kept: {}".format(kept) if kept else "dropped"))
    if kept:
        wrong.append("frozen_optimizer_state='drop' kept the state of layers {}".format(kept))
    uninterrupted = lora_snapshot(model)

    # The same run, saved at --resume-at and resumed by objects built from scratch.
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output_dir or scratch
        model, optimizer, lr_scheduler = build(total)
        sched = layer_scheduler(model, optimizer, args.epochs)
        train(model, optimizer, lr_scheduler, sched, args.resume_at, args.steps_per_epoch)
        save(folder, model, optimizer, lr_scheduler, sched)
        del model, optimizer, lr_scheduler, sched
        model, optimizer, lr_scheduler, sched = resume(folder, total, args.epochs)
        print("resumed from {} at step {}: active layers {}".format(folder, sched.steps, sched.active_layers))
        train(model, optimizer, lr_scheduler, sched, total, args.steps_per_epoch)
        sched.finish()
    resumed = lora_snapshot(model)
    same = all(torch.equal(a, b) for layer in uninterrupted for a, b in zip(uninterrupted[layer], resumed[layer]))
    print("resumed run: final LoRA weights {} the uninterrupted run's".format(
        "bitwise equal to" if same else "DIFFER from"))
    if not same:
        wrong.append("the resumed run's LoRA weights differ from the uninterrupted run's")

    for line in wrong:
        print(line, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
