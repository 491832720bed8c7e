"""Optimizer memory of a rotating schedule: ``frozen_optimizer_state`` keep / drop / offload, side by side.

    python benchmarks/optimizer_state_bench.py            # 12-layer BERT h=256, seq 128, batch 16, 48 steps
    python benchmarks/optimizer_state_bench.py --quick    # seq 32, batch 8, 24 steps
    python benchmarks/optimizer_state_bench.py --device cuda

A BAdam-style cyclic schedule (one layer at a time, descending, a switch every 4 optimizer steps) runs
through ``transformers.Trainer`` + ``LayerScheduleCallback`` once per policy per round (policies in
shuffled order each round).  Per policy: the optimizer-state bytes on the parameters' device after every
step (the ``layer_schedule/optimizer_state_bytes`` tracker scalar: its maximum over the run, against the
state of the active layers + head alone), the median step time (ratio to "keep" = median of per-round
ratios) and, on CUDA, the peak memory of the run.  On a CPU-only machine "offload" moves nothing (the state
is already in CPU memory), so its row shows only the bookkeeping cost.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

import torch

CLOCK = time.perf_counter
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import layer_schedule_bench as lsb  # noqa: E402
from peft import get_peft_model  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from peft_layersched import LayerScheduleCallback  # noqa: E402

POLICIES = ("keep", "drop", "offload")
FULL = dict(lsb.FULL, steps=48, every=4, rounds=3)
QUICK = dict(lsb.QUICK, steps=24, every=4, rounds=2)


class _Data(Dataset):
    def __init__(self, cfg, n):
        self.batch = lsb._batch(dict(cfg, batch=n))

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, i):
        return {k: v[i].cpu() for k, v in self.batch.items()}


class _Clock(TrainerCallback):
    def __init__(self):
        self.times, self.state_bytes, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if lsb.DEVICE.type == "cuda":
            torch.cuda.synchronize()
        self._start = CLOCK()

    def on_step_end(self, args, state, control, **kwargs):
        if lsb.DEVICE.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(CLOCK() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "layer_schedule/optimizer_state_bytes" in logs:
            self.state_bytes.append(logs["layer_schedule/optimizer_state_bytes"])


def run(cfg, policy, out):
    schedule = {"type": "cyclic", "block": 1, "every": cfg["every"], "order": "descending"}
    model = get_peft_model(lsb._base(cfg, cfg["layers"]), lsb._scheduled_config(schedule, schedule_unit="step"))
    clock = _Clock()
    args = TrainingArguments(
        output_dir=out, max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"], learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        **({"use_cpu": True} if lsb.DEVICE.type == "cpu" else {}),
    )
    data = _Data(cfg, cfg["batch"] * cfg["steps"])
    if lsb.DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    callbacks = [LayerScheduleCallback(frozen_optimizer_state=policy), clock]
    Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    peak = torch.cuda.max_memory_allocated() if lsb.DEVICE.type == "cuda" else None
    layer_numel = sum(p.numel() for p in model.base_model.layer_parameters()[cfg["layers"] - 1])
    head_numel = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    return {
        "median_step_s": statistics.median(clock.times[cfg["every"]:]),
        "times": clock.times,
        "max_state_bytes": max(clock.state_bytes),
        "active_only_bytes": 8 * (layer_numel + head_numel),  # Adam: two float32 moments per parameter
        "peak_bytes": peak,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    lsb.add_run_options(parser)
    args = parser.parse_args(argv)
    global CLOCK
    cfg, CLOCK = lsb.apply_run_options(args, FULL, QUICK)
    info = lsb.machine()
    print(lsb.machine_line(info))
    print("config: L{layers} h{hidden} seq {seq} batch {batch}, {steps} steps, switch every {every}, "
          "{rounds} rounds".format(**cfg))
    results = {p: [] for p in POLICIES}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as out:
        for i in range(cfg["rounds"]):
            order = list(POLICIES)
            rng.shuffle(order)
            for policy in order:
                results[policy].append(run(cfg, policy, out))
            print("  round {}/{} done".format(i + 1, cfg["rounds"]))
    print("\n| policy | max optimizer-state bytes | active layer + head alone | step ms | step / keep | peak |")
    print("|---|---:|---:|---:|---:|---:|")
    ok = True
    for policy in POLICIES:
        rows = results[policy]
        ratio = statistics.median(r["median_step_s"] / k["median_step_s"] for r, k in zip(rows, results["keep"]))
        first = rows[0]
        peak = "-" if first["peak_bytes"] is None else "{:.1f} MiB".format(first["peak_bytes"] / 2.0**20)
        print("| {} | {:,.0f} | {:,} | {:.1f} | {:.3f} | {} |".format(
            policy, first["max_state_bytes"], first["active_only_bytes"],
            1e3 * statistics.median(r["median_step_s"] for r in rows), ratio, peak))
        if policy == "drop" and first["max_state_bytes"] != first["active_only_bytes"]:
            ok = False
    print("\ntarget: with 'drop' the optimizer-state bytes at every step = the active layer's + head's: "
          "{}".format("pass" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
