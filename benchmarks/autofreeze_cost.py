"""What autofreeze costs per step beyond the fixed schedule it ends up being (issue #32, point 3).

An autofreeze run decides which layers train; a milestone schedule that replays its decisions trains the
same layers at the same steps without measuring anything. Their step times differ only by what autofreeze
adds: the signal's gradient hooks and per-step reduction, and the decisions. Both run with the HF Trainer on
a 12-layer BERT built from its config, in rounds of a shuffled order, on one thread; the ratio is the
median of per-round ratios of the summed step CPU time.

    python benchmarks/autofreeze_cost.py              # 5 rounds (~6 min on one free core)
    python benchmarks/autofreeze_cost.py --rounds 1 --steps 40
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # examples/tiny_models.py

import tiny_models  # noqa: E402
import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig  # noqa: E402
from peft_layersched.cli.demo import _quiet_libraries  # noqa: E402

BERT = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=12, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=128)
SEQ, BATCH = 64, 16


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=512):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, BERT["vocab_size"], (n, SEQ), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _StepClock(TrainerCallback):
    def __init__(self):
        self.cpu = []

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self.cpu.append(time.process_time() - self._t)


def run(schedule, steps, data, workdir):
    model = get_peft_model(tiny_models.bert(seed=0, **BERT), ScheduledLoraConfig(
        layer_schedule=schedule, schedule_unit="step", r=8, lora_alpha=16, lora_dropout=0.1,
        target_modules=["query", "value"], init_seed=0))
    clock = _StepClock()
    args = TrainingArguments(output_dir=workdir, max_steps=steps, per_device_train_batch_size=BATCH,
                             learning_rate=1e-3, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                             dataloader_pin_memory=False, use_cpu=True, logging_steps=steps)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LayerScheduleCallback(), clock])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    spec = model.peft_config["default"].layer_schedule
    return clock.cpu, spec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _quiet_libraries()
    warnings.filterwarnings("ignore")
    data = _Data()
    autofreeze = {"type": "autofreeze", "every": args.every, "percentile": 50}
    with tempfile.TemporaryDirectory() as workdir:
        _, spec = run(autofreeze, args.steps, data, workdir)  # warm-up; gives the decisions to replay
        milestones = {0: list(range(BERT["num_hidden_layers"]))}
        for decision in spec["decisions"]:
            milestones[decision["t"]] = list(decision["layers"])
        print(f"autofreeze decisions: {[(d['t'], d['layers']) for d in spec['decisions']]}")
        ratios, totals = [], {"autofreeze": [], "milestones": []}
        for r in range(args.rounds):
            order = ["autofreeze", "milestones"]
            random.Random(r).shuffle(order)
            cpu = {}
            for name in order:
                times, _ = run(autofreeze if name == "autofreeze" else milestones, args.steps, data, workdir)
                cpu[name] = sum(times)
                totals[name].append(sum(times))
            ratios.append(cpu["autofreeze"] / cpu["milestones"])
            print(f"round {r}: autofreeze {cpu['autofreeze']:.2f} s, the same layers fixed {cpu['milestones']:.2f} s "
                  f"of step CPU time, ratio {ratios[-1]:.3f}")
    print(f"\nautofreeze / fixed schedule with the same active sets, step CPU time: "
          f"median {statistics.median(ratios):.3f} over {args.rounds} rounds "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
