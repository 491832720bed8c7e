"""torch.compile with a layer schedule, next to compiled vanilla PEFT LoRA (one process, side by side).

    python benchmarks/compile_bench.py            # 12-layer BERT h=256, seq 128, batch 16, inductor
    python benchmarks/compile_bench.py --quick    # seq 32, batch 8, 4 layers, few rounds
    python benchmarks/compile_bench.py --device cuda --json out.json

Part 1, compile counts: a ScheduledLoraConfig model, compiled, trained through three phases ({top},
{top-1, top}, {0}); dynamo's counters give the graph breaks (target: none, as for vanilla LoRA) and the
graphs compiled (target: at most one recompile per switch).
Part 2, speed: ``sched-top`` (adapters preallocated on every layer, phase {top}) and ``vanilla-top`` (PEFT
LoRA on the top layer only), both compiled, timed one optimizer step at a time in shuffled order per round;
the ratio is the median of per-round ratios (target <= 1.03).  The eager ratio is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch

CLOCK = time.perf_counter
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import layer_schedule_bench as lsb  # noqa: E402  (models, batches, machine facts)
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

FULL = dict(lsb.FULL, rounds=9, warmup=3)
QUICK = dict(lsb.QUICK, layers=4, rounds=5, warmup=3)


class Compiled(object):
    def __init__(self, name, cfg, scheduled, compiled, backend):
        layers = cfg["layers"]
        top = layers - 1
        base = lsb._base(cfg, layers)
        if scheduled:
            model = get_peft_model(base, lsb._scheduled_config({0: [top], 1: list(range(layers))}))
            params = [p for p in model.parameters() if p.requires_grad]
            model.activate_layers(0)
        else:
            lora = dict(r=8, lora_alpha=16, lora_dropout=lsb.DROPOUT, task_type="SEQ_CLS")
            model = get_peft_model(base, LoraConfig(target_modules=lsb._top_regex(layers), **lora))
            params = [p for p in model.parameters() if p.requires_grad]
        model.to(lsb.DEVICE).train()
        self.name = name
        self.model = model
        self.run = torch.compile(model, backend=backend) if compiled else model
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.times = []

    def step(self, batch):
        cuda = lsb.DEVICE.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = CLOCK()
        self.run(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return CLOCK() - start


def _graph_breaks():
    return sum(sum(v.values()) for v in counters["graph_break"].values())


def compile_counts(cfg, backend, batch):
    """Graph breaks and graphs of vanilla LoRA (one phase) and of a three-phase schedule."""
    out = {}
    for name, scheduled in (("vanilla-top", False), ("sched", True)):
        torch._dynamo.reset()
        counters.clear()
        variant = Compiled(name, cfg, scheduled, True, backend)
        graphs = []
        top = cfg["layers"] - 1
        phases = [[top], [top - 1, top], [0]] if scheduled else [None, None, None]
        for phase in phases:
            if phase is not None:
                variant.model.base_model.set_layer_schedule({0: phase})
                variant.model.activate_layers(0)
            for _ in range(2):
                variant.step(batch)
            graphs.append(counters["stats"]["unique_graphs"])
        out[name] = {"graph_breaks": _graph_breaks(), "graphs_after_each_phase": graphs}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lsb.add_run_options(parser)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    global CLOCK
    cfg, CLOCK = lsb.apply_run_options(args, FULL, QUICK)
    info = lsb.machine()
    print(lsb.machine_line(info))
    batch = lsb._batch(cfg)
    counts = compile_counts(cfg, args.backend, batch)
    print("compile counts ({} backend): {}".format(args.backend, counts))

    torch._dynamo.reset()
    variants = [
        Compiled(name, cfg, scheduled, compiled, args.backend)
        for name, scheduled, compiled in (
            ("vanilla-top compiled", False, True), ("sched-top compiled", True, True),
            ("vanilla-top eager", False, False), ("sched-top eager", True, False),
        )
    ]
    for v in variants:
        start = time.perf_counter()
        for _ in range(cfg["warmup"]):
            v.step(batch)
        print("  {}: warm-up (compile) {:.1f} s".format(v.name, time.perf_counter() - start))
    rng = random.Random(0)
    order = list(variants)
    for _ in range(cfg["rounds"]):
        rng.shuffle(order)
        for v in order:
            v.times.append(v.step(batch))
    by = {v.name: v for v in variants}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(by[a].times, by[b].times))

    sched = counts["sched"]
    switches = len(sched["graphs_after_each_phase"]) - 1
    rows = [
        ("graph breaks, sched (vanilla: {})".format(counts["vanilla-top"]["graph_breaks"]),
         sched["graph_breaks"], counts["vanilla-top"]["graph_breaks"]),
        ("graphs after each phase, sched (vanilla: {})".format(counts["vanilla-top"]["graphs_after_each_phase"]),
         sched["graphs_after_each_phase"][-1],
         counts["vanilla-top"]["graphs_after_each_phase"][-1] * (1 + switches)),
        ("compiled sched-top / compiled vanilla-top", ratio("sched-top compiled", "vanilla-top compiled"), 1.03),
        ("eager sched-top / eager vanilla-top", ratio("sched-top eager", "vanilla-top eager"), None),
        ("compiled / eager, vanilla-top", ratio("vanilla-top compiled", "vanilla-top eager"), None),
    ]
    print("\n| variant | median ms |\n|---|---:|")
    for v in variants:
        print("| {} | {:.1f} |".format(v.name, 1e3 * statistics.median(v.times)))
    print("\n| measured (L{}, {} backend, {}) | value | limit |\n|---|---:|---:|".format(
        cfg["layers"], args.backend, lsb.DEVICE))
    for what, value, limit in rows:
        shown = "{:.4g}".format(value) if isinstance(value, float) else str(value)
        print("| {} | {} | {} |".format(what, shown, "" if limit is None else limit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "config": cfg, "counts": counts, "rows": rows}, f, indent=2, default=str)
    failed = [what for what, value, limit in rows if limit is not None and value > limit]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
