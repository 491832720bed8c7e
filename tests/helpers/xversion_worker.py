"""Run by tests/test_cross_version.py, in this or another tox env's interpreter (e.g. PEFT 0.3.0).

    cd tests && python -m helpers.xversion_worker save DIR    train a scheduled adapter and save it (+ base weights)
    cd tests && python -m helpers.xversion_worker load DIR    load DIR's adapter, check outputs, continue the schedule

Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import PeftModel, get_peft_model

import peft_layersched
from peft_layersched import ScheduledLoraConfig

from helpers import tiny_models

SCHEDULE = {0: [11], 2: [1, 11]}


def _inputs():
    return tiny_models.example_inputs("bert", batch=4, seq=8, seed=5)


def _base(folder):
    base = tiny_models.bert()
    path = os.path.join(folder, "base.pt")
    if os.path.exists(path):
        # transformers releases initialise differently: both sides use the same saved base weights.
        missing, unexpected = base.load_state_dict(torch.load(path), strict=False)
        assert all(k.endswith("position_ids") for k in list(missing) + list(unexpected)), (missing, unexpected)
    else:
        torch.save({k: v for k, v in base.state_dict().items() if not k.endswith("position_ids")}, path)
    return base


def _train(model, steps, seed):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = _inputs()
        labels = torch.randint(0, 2, (batch["input_ids"].shape[0],), generator=generator)
        model(labels=labels, **batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return optimizer


def _logits(model):
    with torch.no_grad():
        return model(**_inputs()).logits


def save(folder):
    os.makedirs(folder, exist_ok=True)
    config = ScheduledLoraConfig(
        r=4, target_modules=["query", "value"], layer_schedule=SCHEDULE, task_type="SEQ_CLS", init_seed=0
    )
    model = get_peft_model(_base(folder), config)
    model.activate_layers(0)
    _train(model, 3, seed=1)
    model.activate_layers(2)
    _train(model, 2, seed=2)
    model.save_pretrained(os.path.join(folder, "adapter"))
    torch.save(_logits(model), os.path.join(folder, "expected.pt"))
    return {"saved": sorted(os.listdir(os.path.join(folder, "adapter")))}


def load(folder):
    model = PeftModel.from_pretrained(_base(folder), os.path.join(folder, "adapter"), is_trainable=True)
    model.eval()
    expected = torch.load(os.path.join(folder, "expected.pt"))
    difference = float((_logits(model) - expected).abs().max())
    tuner = type(model.base_model).__name__
    active = model.activate_layers(3)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    _train(model, 1, seed=3)
    changed = sorted(
        {
            n.split(".layer.")[1].split(".")[0]
            for n, p in model.named_parameters()
            if "lora_B" in n and not torch.equal(p, before[n])
        }
    )
    return {
        "tuner": tuner,
        "max_abs_diff": difference,
        "active": active,
        "ever_active": model.ever_active_layers,
        "changed_layers": changed,
        "peft": peft_layersched._compat.PEFT_VERSION,
    }


if __name__ == "__main__":
    command, directory = sys.argv[1], sys.argv[2]
    result = save(directory) if command == "save" else load(directory)
    print(json.dumps(result))
