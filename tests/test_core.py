"""Real training loops (AdamW with weight decay, dropout) over a schedule: a preallocated layer is bitwise
invisible until its phase, and a layer that left the schedule stays bitwise still.

Placement, activation, save/load and export on every model family: ``test_tuner.py``, ``test_layers.py``,
``test_save_load_export.py``.
"""

from __future__ import annotations

import torch
from peft import get_peft_model

from peft_layersched import ScheduledLoraConfig

from helpers import tiny_models


def _train_epochs(schedule, epochs, preallocate=None):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_models.bert(),
        ScheduledLoraConfig(
            r=4,
            target_modules=["query", "value"],
            layer_schedule=schedule,
            preallocate_layers=preallocate,
            lora_dropout=0.1,
            init_seed=0,
            task_type="SEQ_CLS",
        ),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    losses, snapshots = [], []
    model.train()
    for epoch in range(epochs):
        model.activate_layers(epoch)
        for _ in range(3):
            ids = torch.randint(1, 99, (4, 8), generator=generator)
            labels = torch.randint(0, 2, (4,), generator=generator)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    return losses, snapshots


def test_preallocation_is_bitwise_invisible_until_the_layer_activates():
    with_later, snaps_a = _train_epochs({0: [11], 3: [1, 11]}, 5)
    without, snaps_b = _train_epochs({0: [11]}, 3)
    # Epochs 0-2: identical losses and top-layer weights (dropout 0.1, AdamW with weight decay).
    for a, b in zip(with_later[:9], without):
        assert torch.equal(a, b)
    for name, value in snaps_b[2].items():
        assert torch.equal(snaps_a[2][name], value), name
    # Layer 1 is untouched until epoch 3, then trains.
    layer1 = [n for n in snaps_a[0] if ".layer.1." in n]
    assert layer1 and all(torch.equal(snaps_a[0][n], snaps_a[2][n]) for n in layer1)
    assert any(not torch.equal(snaps_a[2][n], snaps_a[4][n]) for n in layer1)


def test_frozen_layer_is_bitwise_still_under_adamw_weight_decay():
    _, snaps = _train_epochs({0: [11], 2: [1]}, 4)
    top = [n for n in snaps[0] if ".layer.11." in n]
    assert any(not torch.equal(snaps[0][n], snaps[1][n]) for n in top)
    assert all(torch.equal(snaps[1][n], snaps[3][n]) for n in top)
