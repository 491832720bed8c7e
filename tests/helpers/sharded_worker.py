"""One rank of a 2-process sharded run (gloo, CPU), launched by tests/test_sharded.py via torchrun.

    cd tests && python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m helpers.sharded_worker OUT_DIR KIND[,KIND...]

Kinds: ``zero1``, ``zero2``, ``zero3`` (the Trainer with TrainingArguments(deepspeed=...) and LayerScheduleCallback;
``zero2`` also saves a checkpoint at step 6 and a second run resumes from it), ``fsdp2`` and ``fsdp1``
(a plain loop over torch's fully_shard / FullyShardedDataParallel(use_orig_params=True)).  Each writes
OUT_DIR/<kind><rank>.json: per optimizer step the active layers, a hash of each layer's full LoRA
weights after that step and (DeepSpeed) each layer group's learning rate.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from transformers import TrainerCallback

from peft_layersched import LayerScheduleCallback
from peft_layersched.training.engines import LAYER_KEY

from helpers.leave import leave_together
from helpers.toy_training import ToyClassification, cpu_flag, scheduled_bert, train

LAYERS = 4
# layer 3 trains epochs 0-1 and is frozen after; layer 1 joins at epoch 2 (4 optimizer steps per epoch)
SCHEDULE = {0: [3], 2: [1]}
LR_SCALE = 0.5


def digest(tensors):
    h = hashlib.sha256()
    for tensor in tensors:
        h.update(tensor.detach().float().cpu().clone().numpy().tobytes())  # a copy: FSDP frees the storage
    return h.hexdigest()[:16]


def zero3_hashes(model):
    import deepspeed

    out = {}
    for layer, params in model.base_model.layer_parameters().items():
        with deepspeed.zero.GatheredParameters(params):
            out[str(layer)] = digest(params)
    return out


def plain_hashes(model):
    return {str(layer): digest(params) for layer, params in model.base_model.layer_parameters().items()}


class Recorder(TrainerCallback):
    def __init__(self, hashes):
        self.hashes = hashes
        self.steps = []

    def _record(self, state, model, optimizer, scheduler):
        lrs = {}
        if optimizer is not None:
            for group in optimizer.param_groups:
                if LAYER_KEY in group:
                    lrs[str(group[LAYER_KEY])] = group["lr"]
        self.steps.append({
            "step": state.global_step, "active": model.active_layers, "hashes": self.hashes(model), "lrs": lrs,
            "scheduled_lr": scheduler.get_last_lr()[0] if scheduler is not None else None,
        })

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        self._record(state, model, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        # Listed after LayerScheduleCallback: `active` and `lrs` are those of the next step.
        self._record(state, model, optimizer, lr_scheduler)


ADAPTIVE = {"type": "adaptive", "k": 1, "every": 2, "policy": "sample", "explore": 0.2}


def deepspeed_run(out_dir, stage, resume=None, save_steps=None, schedule=SCHEDULE, unit="epoch"):
    config = {
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
    }
    if stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    model = scheduled_bert(schedule, unit=unit, num_layers=LAYERS)
    recorder = Recorder(zero3_hashes if stage == 3 else plain_hashes)
    save = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    trainer = train(
        model, out_dir, callbacks=[LayerScheduleCallback(new_layer_lr_scale=LR_SCALE), recorder],
        dataset=ToyClassification(n=32), resume=resume, deepspeed=config, ddp_backend="gloo", **save, **cpu_flag(),
    )
    trainer.save_model(os.path.join(out_dir, "adapter"))
    adaptive = [e for e in trainer.state.log_history if "layer_schedule_adaptive" in e]
    decisions = adaptive[0]["layer_schedule_adaptive"]["decisions"] if adaptive else None
    return {"steps": recorder.steps, "engine": type(trainer.model_wrapped).__name__, "decisions": decisions}


def fsdp_run(kind):
    from peft import get_peft_model  # noqa: F401  (the model comes from scheduled_bert)

    rank = torch.distributed.get_rank()
    model = scheduled_bert(SCHEDULE, num_layers=LAYERS, dropout=0.0)
    layers = model.base_model.model.bert.encoder.layer
    if kind == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.4 .. 2.5
            from torch.distributed._composable.fsdp import fully_shard
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model

        def hashes():
            out = {}
            for layer, params in model.base_model.layer_parameters().items():
                out[str(layer)] = digest([p.full_tensor() if hasattr(p, "full_tensor") else p for p in params])
            return out
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        block = type(layers[0])
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                       auto_wrap_policy=ModuleWrapPolicy({block}))

        def hashes():
            with FSDP.summon_full_params(wrapped):
                return {str(layer): digest(params) for layer, params in model.base_model.layer_parameters().items()}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    data = ToyClassification(n=32)
    steps = [{"step": 0, "active": model.active_layers, "hashes": hashes()}]
    step = 0
    for epoch in range(4):
        active = model.activate_layers(epoch)
        for batch in range(4):
            index = torch.arange(8)[rank::2] + 8 * batch  # this rank's half of the batch
            out = wrapped(input_ids=data.ids[index], labels=data.labels[index])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps.append({"step": step, "active": active, "hashes": hashes()})
    return {"steps": steps, "engine": type(wrapped).__name__}


def main(out_dir, kind):
    if kind == "zero2-adaptive":
        result = deepspeed_run(os.path.join(out_dir, kind), 2, schedule=ADAPTIVE, unit="step", save_steps=8)
        resumed = deepspeed_run(os.path.join(out_dir, kind + "-resumed"), 2, schedule=ADAPTIVE, unit="step",
                                resume=os.path.join(out_dir, kind, "checkpoint-8"))
        result["resumed"], result["resumed_decisions"] = resumed["steps"], resumed["decisions"]
    elif kind.startswith("zero"):
        stage = int(kind[-1])
        result = deepspeed_run(os.path.join(out_dir, kind), stage, save_steps=6 if stage == 2 else None)
        if stage == 2:
            resumed = deepspeed_run(os.path.join(out_dir, kind + "-resumed"), stage,
                                    resume=os.path.join(out_dir, kind, "checkpoint-6"))
            result["resumed"] = resumed["steps"]
    else:
        result = fsdp_run(kind)
    rank = torch.distributed.get_rank()
    result["world"] = torch.distributed.get_world_size()
    with open(os.path.join(out_dir, "{}{}.json".format(kind, rank)), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    if not torch.distributed.is_initialized() and sys.argv[2].split(",")[0].startswith("fsdp"):
        torch.distributed.init_process_group("gloo")
    for name in sys.argv[2].split(","):
        if name.startswith("fsdp") and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        main(sys.argv[1], name)
    leave_together()
