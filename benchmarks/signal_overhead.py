"""What measuring an adaptive schedule's signal costs per optimizer step (issue target: <= 1 % of a step).

Two models train the same layers side by side, steps interleaved (the machine is noisy): one with a fixed
schedule, one with an adaptive schedule that measures its signal at every step (tensor hooks for
``grad_norm``, a weight snapshot for ``update``) but decides only once, at ``t = 0``, so both train the same
layers throughout.  Prints each signal's median step time relative to the fixed schedule's (noisy on a
shared machine), and the time spent in the package's own code per step: ``LayerScheduler.step()`` (the fold,
the reduction, the ``update`` comparison) plus the gradient hooks, timed around each call.

    python benchmarks/signal_overhead.py [--steps 60] [--layers 6] [--hidden 256] [--seq 128] [--batch 8]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from peft import get_peft_model

from peft_layersched import LayerScheduler, ScheduledLoraConfig

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import tiny_models  # noqa: E402  (examples/tiny_models.py)


def build(schedule, args, device):
    base = tiny_models.bert(args.layers, seed=0, hidden_size=args.hidden, num_attention_heads=4,
                            intermediate_size=4 * args.hidden, vocab_size=1000, max_position_embeddings=args.seq)
    model = get_peft_model(base, ScheduledLoraConfig(
        r=8, target_modules=["query", "key", "value", "output.dense", "intermediate.dense"],  # not pooler.dense
        layer_schedule=schedule, schedule_unit="step", task_type="SEQ_CLS", lora_dropout=0.0)).to(device)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-4)
    return model, optimizer, LayerScheduler(model, optimizer, warn_on_no_update=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 1000, (args.batch, args.seq), generator=generator).to(device),
             "labels": torch.randint(0, 2, (args.batch,), generator=generator).to(device)}
    never = 10 ** 9  # one decision, at t = 0: the active set stays, the signal is measured at every step
    runs = {}
    for signal in ("grad_norm", "update"):
        spec = {"type": "adaptive", "k": args.k, "every": never, "signal": signal, "policy": "top", "explore": 0}
        runs[signal] = build(spec, args, device)
    chosen = runs["grad_norm"][2].active_layers
    runs["fixed"] = build({0: chosen}, args, device)
    assert all(run[2].active_layers == chosen for run in runs.values())
    times = {name: [] for name in runs}
    inside = {name: 0.0 for name in runs}  # seconds spent in the package's own measuring code
    for name in ("grad_norm", "update"):
        meter = runs[name][2].meter
        meter.detach()
        make = meter._grad_hook

        def timed(i, make=make, name=name):
            hook = make(i)

            def run(grad):
                start = time.perf_counter()
                hook(grad)
                inside[name] += time.perf_counter() - start

            return run

        meter._grad_hook = timed
        meter.track(chosen)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = list(runs)
    for step in range(args.steps + 5):
        for name in names[step % 3:] + names[:step % 3]:  # the order rotates: no run is always first
            model, optimizer, sched = runs[name]
            sync()
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizer.step()
            before = time.perf_counter()
            sched.step()
            after = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= 5:  # warm-up steps left out
                times[name].append(time.perf_counter() - start)
                inside[name] += after - before
            elif name in inside:
                inside[name] = 0.0
    fixed = statistics.median(times["fixed"])
    print("step: BERT {} layers, hidden {}, seq {}, batch {}, LoRA r8 on q/k/v/dense, {} active layers, {} "
          "({} interleaved steps each)".format(args.layers, args.hidden, args.seq, args.batch, args.k, device,
                                               args.steps))
    print("| schedule | median step | vs fixed schedule (side by side) | in LayerScheduler.step() + grad hooks "
          "/ step |")
    print("|---|---|---|---|")
    for name in ("fixed", "grad_norm", "update"):
        median = statistics.median(times[name])
        own = inside[name] / max(len(times[name]), 1)
        print("| {} | {:.2f} ms | {:+.2f} % | {:.3f} ms = {:.3f} % |".format(
            "fixed (milestones)" if name == "fixed" else "adaptive, signal " + name, 1e3 * median,
            100.0 * (median / fixed - 1.0), 1e3 * own, 100.0 * own / median))


if __name__ == "__main__":
    main()
