"""A layer schedule in a plain PyTorch training loop: no Trainer, no callback.

Fine-tunes a small causal LM (LLaMA-style, built from a config: no download) on a toy next-token task
with LoRA on the top layer first, then the top two, then a lower layer instead.  Shows the three rules
of a hand-written loop:

1. build the optimizer right after ``get_peft_model``: every preallocated LoRA parameter requires grad
   then, so the optimizer holds the layers that join later too;
2. call ``model.activate_layers(epoch)`` at each epoch boundary (before the epoch's first step);
3. zero grads with ``set_to_none=True``: frozen layers keep ``grad=None``, so AdamW skips them (no
   drift from momentum or weight decay).

    python examples/plain_torch_loop.py [--epochs 4] [--output-dir DIR]

It prints one line per epoch (active layers, mean loss) and checks, at the end, that each layer's LoRA
weights changed exactly in the epochs it was scheduled.  Exit code 0 when they did.
"""

from __future__ import annotations

import argparse
import sys

import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from peft_layersched import ScheduledLoraConfig

SCHEDULE = {0: [-1], 1: [-2, -1], 3: [1]}  # layer 3 (top), then 2 and 3, then layer 1 alone


def build_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def batches(steps: int, seed: int = 0):
    """A toy task: each sequence counts up modulo the vocabulary from a random start."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, 64, (8, 1), generator=generator)
        ids = (start + torch.arange(16)) % 64
        yield {"input_ids": ids, "labels": ids}


def lora_snapshot(model) -> dict:
    """Each preallocated layer's LoRA tensors, copied (``layer_parameters()`` groups them by layer)."""
    return {layer: [p.detach().clone() for p in params] for layer, params in model.layer_parameters().items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=8)
    parser.add_argument("--output-dir", default=None, help="save the adapter here and reload it")
    args = parser.parse_args(argv)

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
    tuner = model.base_model
    print("adapters preallocated on layers", tuner.preallocated_layers)

    # Rule 1: the optimizer now, while every preallocated LoRA parameter requires grad.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    changed_per_epoch = []
    for epoch in range(args.epochs):
        active = model.activate_layers(epoch)  # Rule 2: at the epoch boundary
        before = lora_snapshot(model)
        losses = []
        for batch in batches(args.steps_per_epoch, seed=epoch):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # Rule 3
            losses.append(float(loss.detach()))
        after = lora_snapshot(model)
        changed = [
            layer for layer in after if any(not torch.equal(a, b) for a, b in zip(before[layer], after[layer]))
        ]
        changed_per_epoch.append((active, changed))
        print(
            "epoch {}  active layers {}  mean loss {:.4f}  LoRA changed in layers {}".format(
                epoch, active, sum(losses) / len(losses), changed
            )
        )

    if args.output_dir:
        model.save_pretrained(args.output_dir)
        reloaded = PeftModel.from_pretrained(build_model(), args.output_dir, is_trainable=True)
        reloaded.activate_layers(args.epochs)
        print("reloaded from {}: active layers {}".format(args.output_dir, reloaded.base_model.active_layers))

    wrong = [(epoch, a, c) for epoch, (a, c) in enumerate(changed_per_epoch) if a != c]
    for epoch, active, changed in wrong:
        print("epoch {}: scheduled {} but LoRA changed in {}".format(epoch, active, changed), file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
