"""Optimizer-state and gradient bytes per rank under DDP, FSDP2 and DeepSpeed ZeRO-2/3, with a layer
schedule: phase {top} (one of 12 preallocated layers active) against every layer active.

    torchrun --nproc_per_node 2 benchmarks/sharded_memory.py [--layers 12 --hidden 256 --r 8 --json OUT]

CPU, gloo.  Every variant preallocates LoRA (query, value) on all layers of a BERT built from a config and
runs 3 optimizer steps with AdamW; the byte counts are read off the tensors each rank holds after the
last backward (gradients) and after the last step (optimizer state: Adam moments, step counters).  ZeRO runs
the way LayerScheduleCallback sets it up (one param group per layer, frozen layers at LR 0, requires_grad
never changed), so its optimizer state is that of every layer in either phase; DDP and FSDP2 freeze with
requires_grad, so AdamW holds state for the layers that trained.  Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import tiny_models  # noqa: E402  (examples/tiny_models.py)
from peft import get_peft_model  # noqa: E402

from peft_layersched import ScheduledLoraConfig  # noqa: E402
from peft_layersched.training.engines import layer_groups, split_by_layer  # noqa: E402


def build(layers, hidden, r, phase):
    base = tiny_models.bert(layers, seed=0, hidden_size=hidden, num_attention_heads=4, intermediate_size=4 * hidden,
                            vocab_size=1000)
    active = [layers - 1] if phase == "top" else list(range(layers))
    config = ScheduledLoraConfig(r=r, target_modules=["query", "value"], layer_schedule={0: active},
                                 preallocate_layers=list(range(layers)), init_seed=0)
    return get_peft_model(base, config)


def local_bytes(tensor):
    if tensor is None:
        return 0
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def state_bytes(optimizer):
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def batch(rank, step):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(1, 1000, (4, 32), generator=generator), torch.randint(0, 2, (4,), generator=generator)


def run_torch(engine, model, steps=3):
    rank = dist.get_rank()
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    else:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.4 .. 2.5
            from torch.distributed._composable.fsdp import fully_shard
        for layer in model.base_model.model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        wrapped = model
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-3)
    model.activate_layers(0)
    grads = 0
    for step in range(steps):
        ids, labels = batch(rank, step)
        wrapped(input_ids=ids, labels=labels).loss.backward()
        grads = sum(local_bytes(p.grad) for p in wrapped.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return state_bytes(optimizer), grads


def run_zero(stage, model, steps=3):
    import deepspeed

    rank = dist.get_rank()
    model.base_model.set_freezing("optimizer")
    model.activate_layers(0)
    active = set(model.active_layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    layer_of = {id(p): layer for layer, ps in model.base_model.layer_parameters().items() for p in ps}
    split_by_layer(optimizer, layer_of)
    for layer, indices in layer_groups(optimizer).items():  # frozen layers at LR 0, as the lr-zero engine runs
        for index in indices:
            optimizer.param_groups[index]["lr"] = 1e-3 if layer in active else 0.0
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer,
        config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9},
    )
    grads = 0
    for step in range(steps):
        ids, labels = batch(rank, step)
        engine.backward(engine(input_ids=ids, labels=labels).loss)
        held = getattr(zero_optimizer, "averaged_gradients", {}) or {}
        values = held.values() if isinstance(held, dict) else held
        grads = sum(local_bytes(t) for group in values for t in (group if isinstance(group, list) else [group]))
        if not grads:  # stage 3 keeps the reduced gradient partitions in its fp32 groups' .grad
            flat = getattr(zero_optimizer, "fp32_partitioned_groups_flat", [])
            grads = sum(local_bytes(getattr(p, "grad", None)) for p in flat)
        engine.step()
    return state_bytes(zero_optimizer.optimizer), grads


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--engines", default="ddp,fsdp2,zero2,zero3")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for engine in args.engines.split(","):
        for phase in ("top", "all"):
            model = build(args.layers, args.hidden, args.r, phase)
            if engine.startswith("zero"):
                state, grads = run_zero(int(engine[-1]), model)
            else:
                state, grads = run_torch(engine, model)
            totals = torch.tensor([state, grads], dtype=torch.float64)
            gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(world)]
            dist.all_gather(gathered, totals)
            rows.append({"engine": engine, "phase": phase, "state_bytes": [int(t[0]) for t in gathered],
                         "grad_bytes": [int(t[1]) for t in gathered]})
    if rank == 0:
        print(f"{args.layers}-layer BERT h={args.hidden}, LoRA r={args.r} on query/value of every layer, "
              f"{world} ranks (CPU, gloo); bytes per rank (rank 0 / rank 1):")
        print(f"{'engine':8} {'phase':6} {'optimizer state':>26} {'gradients':>26}")
        for row in rows:
            state = " / ".join(f"{b / 1024:.1f} KiB" for b in row["state_bytes"])
            grads = " / ".join(f"{b / 1024:.1f} KiB" for b in row["grad_bytes"])
            print(f"{row['engine']:8} {row['phase']:6} {state:>26} {grads:>26}")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
