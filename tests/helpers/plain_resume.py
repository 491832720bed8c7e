"""A plain training loop (no Trainer) stopped and resumed in each order a user may follow, as docs/loops.md
states them (tests/test_resume_orders.py; under 2-rank DDP through helpers/plain_resume_worker.py).

Every rank trains on its own batches (the seed depends on the rank).  A run saves what docs/loops.md says
(the adapter's weights, the optimizer's, LR scheduler's and ``LayerScheduler``'s state dicts) with
``torch.save``, rank 0 writing and every rank reading, as a real resume does.
"""

from __future__ import annotations

import hashlib
import os
import warnings

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from peft_layersched import LayerScheduler

from helpers.snapshots import lora
from helpers.toy_training import ToyClassification, scheduled_bert

SIGNALS = ("grad_norm", "update", "outlier", "weight_norm")
FIXED = {0: [0], 3: [1], 6: [0, 2], 9: [3]}  # layer 0 freezes at 3 and rejoins at 6 (warm-up of 2 steps)
# "docs": the optimizer's and LR scheduler's state, LayerScheduler(..., state_dict=saved), then the weights;
# "weights-first": the weights, then the same; "load_state_dict": LayerScheduler(model, optimizer) built first,
# then the optimizer's and LR scheduler's state, sched.load_state_dict(saved), then the weights.
ORDERS = ("docs", "weights-first", "load_state_dict")
STEPS, RESUME_AT, AGAIN_AT = 10, 5, 7  # 5 and 7: between two decisions (every 2), inside a fixed phase


def schedule_of(kind):
    if kind == "fixed":
        return FIXED
    return {"type": "adaptive", "k": 1, "every": 2, "policy": "top", "explore": 0.0, "signal": kind}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank():
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def batch(step):
    data = ToyClassification(n=16, seed=1000 * rank() + step)  # each rank its own data
    return {"input_ids": data.ids[:4], "labels": data.labels[:4]}


def calibration():
    return [batch(100 + i) for i in range(2)]


def build(kind):
    """The model (and its DDP wrapper under torchrun), the optimizer over param_groups, the LR scheduler."""
    torch.manual_seed(0)
    model = scheduled_bert(schedule_of(kind), unit="step", num_layers=4, dropout=0.0)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / 20.0)
    wrapped = model
    if _dist() is not None:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    return model, wrapped, optimizer, lr_scheduler


def layer_scheduler(wrapped, optimizer, state=None):
    return LayerScheduler(wrapped, optimizer, total_steps=STEPS, new_layer_warmup_steps=2,
                          calibration_data=calibration(), state_dict=state)


def train(run, start, end):
    model, wrapped, optimizer, lr_scheduler, sched = run
    for step in range(start, end):
        wrapped.train()
        torch.manual_seed(step)  # the base model's dropout: the same draws whether resumed or not
        wrapped(**batch(step)).loss.backward()
        optimizer.step()
        lr_scheduler.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def save(run, path):
    model, _, optimizer, lr_scheduler, sched = run
    state = {"weights": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "scheduler": sched.state_dict()}
    if rank() == 0:
        torch.save(state, path)
    if _dist() is not None:
        _dist().barrier()


def resume(kind, path, order):
    """A run resumed from ``path`` in ``order``; returns it and the UserWarnings the resume gave."""
    saved = torch.load(path, weights_only=False)
    model, wrapped, optimizer, lr_scheduler = build(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "weights-first":
            set_peft_model_state_dict(model, saved["weights"])
        if order == "load_state_dict":
            sched = layer_scheduler(wrapped, optimizer)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if order == "load_state_dict":
            sched.load_state_dict(saved["scheduler"])
        else:
            sched = layer_scheduler(wrapped, optimizer, saved["scheduler"])
        if order != "weights-first":
            set_peft_model_state_dict(model, saved["weights"])
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return (model, wrapped, optimizer, lr_scheduler, sched), said


def differences(whole, run):
    """What differs between the uninterrupted run and a resumed one at the end: LoRA weights (bitwise), the
    scheduler's whole state_dict, the model's ever-active layers and schedule position."""
    out = []
    expected, got = lora(whole[0]), lora(run[0])
    moved = sorted(n.split("encoder.")[-1] for n in expected if not torch.equal(expected[n], got[n]))
    if moved:
        out.append(f"LoRA weights differ: {moved[:4]}")
    want, have = whole[4].state_dict(), run[4].state_dict()
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            out.append(f"state_dict[{key!r}]: uninterrupted {want.get(key)!r}, resumed {have.get(key)!r}")
    config_keys = ("ever_active_layers", "schedule_position", "layer_schedule")
    for key in config_keys:
        if getattr(whole[0].peft_config["default"], key) != getattr(run[0].peft_config["default"], key):
            out.append(f"config {key} differs")
    return out


def check(kind, folder):
    """The uninterrupted run, then for each order: resumed at RESUME_AT, saved again at AGAIN_AT and resumed a
    second time; returns ``{order: {"first": [differences], "second": [...], "warnings": [...]}}`` and the
    final LoRA weights' hash (to compare ranks)."""
    model, wrapped, optimizer, lr_scheduler = build(kind)
    whole = train((model, wrapped, optimizer, lr_scheduler, layer_scheduler(wrapped, optimizer)), 0, RESUME_AT)
    first = os.path.join(folder, f"{kind}-{RESUME_AT}.pt")
    save(whole, first)
    train(whole, RESUME_AT, STEPS)
    results = {}
    for order in ORDERS:
        run, said = resume(kind, first, order)
        train(run, RESUME_AT, AGAIN_AT)
        again = os.path.join(folder, f"{kind}-{order}-{AGAIN_AT}.pt")
        save(run, again)
        train(run, AGAIN_AT, STEPS)
        second, said_again = resume(kind, again, order)
        train(second, AGAIN_AT, STEPS)
        results[order] = {"first": differences(whole, run), "second": differences(whole, second),
                          "warnings": said + said_again}
    digest = hashlib.sha256()
    for _, param in sorted(lora(whole[0]).items()):
        digest.update(param.cpu().contiguous().numpy().tobytes())
    return results, digest.hexdigest()
