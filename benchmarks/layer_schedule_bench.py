"""What a phase with few active layers costs, next to vanilla PEFT LoRA (issue #6).

Every variant is built in this one process and timed one optimizer step at a time, round after round,
in a shuffled order per round, so machine noise (other processes, frequency changes) hits all variants
alike.  A ratio is the median of the per-round ratios of two variants; the table also shows each
variant's median step time.  Peak RSS (P6) needs a fresh process per measurement: those run as
subprocesses of this script (``--rss-worker``), interleaved too.

    python benchmarks/layer_schedule_bench.py            # the issue's setup (12-layer BERT h=256, seq 128, batch 16)
    python benchmarks/layer_schedule_bench.py --quick    # same variants, small inputs, few rounds (~3 min)
    python benchmarks/layer_schedule_bench.py --json out.json   # also write every number as JSON ("-": stdout)

Variants (r = LoRA rank, L = layers; LoRA on query/value, lora_dropout 0.1, SEQ_CLS head trainable):

* ``vanilla-top``      PEFT LoraConfig on the top layer only: the floor.
* ``vanilla-all``      PEFT LoRA on all L layers, all trainable.
* ``vanilla-frozen``   PEFT LoRA on all L layers, the L-1 lower ones requires_grad=False (the usual recipe).
* ``sched-top``        ScheduledLoraConfig, adapters preallocated on all L layers, phase {top}.
* ``sched-top-trained`` the same phase after every layer has been active: the lower adapters are frozen
  but keep contributing (their forward cost is allowed; reported, not a target).
* ``*-gc-nr`` / ``*-gc-re``  the same with transformers gradient checkpointing, non-reentrant / reentrant
  (enabled on the base model before get_peft_model, with the input-require-grads hook the vanilla recipe
  needs).

Targets: P1 sched-top / vanilla-top <= 1.02 (r 8 and 64); P2 the same with L = 48; P3 sched-top /
vanilla-all <= floor * 1.02 (floor = vanilla-top / vanilla-all); P4 sched-top-gc / vanilla-all-gc <= 0.6,
and gradients of phases whose lowest active layer is L-1, then 0, equal plain autograd without
checkpointing; P5 LayerScheduler.step() (and LayerScheduleCallback's events) per optimizer step <= 0.5 % of a
sched-top step; P6 the
optimizer holds state only for ever-active parameters, and peak RSS of sched-top <= vanilla-top + 2 %.
``--depths 24,48`` adds P3 and P4 rows (r8) for models of those depths: how the costs grow with depth.

Runs on every supported stack (Python 3.7 / transformers 4.30 too: only reentrant checkpointing there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
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
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_layersched  # noqa: E402
from peft_layersched import LayerScheduleCallback, LayerScheduler, ScheduledLoraConfig, _compat  # noqa: E402

FULL = dict(
    layers=12,
    big_layers=48,
    hidden=256,
    heads=4,
    intermediate=1024,
    seq=128,
    batch=16,
    rounds=9,
    warmup=2,
    rss_rounds=3,
    rss_steps=3,
    big_ranks=(8,),
)
QUICK = dict(FULL, seq=32, batch=8, rounds=5, warmup=1, rss_rounds=1, rss_steps=2)
RANKS = (8, 64)
DEVICE = torch.device("cpu")  # --device
DROPOUT = 0.1
TARGET_MODULES = ["query", "value"]


# ---------------------------------------------------------------------------------------- models


def _base(cfg, layers, seed=0):
    # BertConfig's own vocabulary and positions, as bert-base has
    return tiny_models.bert(layers, seed, hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                            intermediate_size=cfg["intermediate"], vocab_size=30522, max_position_embeddings=512)


def _scheduled_config(schedule, r=8, **extra):
    return ScheduledLoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=DROPOUT,
        target_modules=TARGET_MODULES,
        layer_schedule=schedule,
        init_seed=0,
        task_type="SEQ_CLS",
        **extra,
    )


def _top_regex(layers):
    return r".*encoder\.layer\.{}\.attention\.self\.(query|value)".format(layers - 1)


def _gc(base, kind):
    """Checkpointing the way a vanilla user turns it on; False where this transformers cannot."""
    if kind is None:
        return True
    if not _compat.enable_gradient_checkpointing(base, reentrant=(kind == "re")):
        return False
    if not _compat.input_require_grads_hooks(base):
        # transformers 4.x leaves it to the user (PEFT 0.3.0 does not add it); 5.x adds it itself.
        base.enable_input_require_grads()
    return True


class Variant(object):
    def __init__(self, name, r, layers, kind, gc=None):
        self.name = name
        self.r = r
        self.layers = layers
        self.kind = kind  # vanilla-top | vanilla-all | vanilla-frozen | sched-top | sched-top-trained
        self.gc = gc  # None | "nr" | "re"
        self.model = None
        self.optimizer = None
        self.times = []

    def build(self, cfg):
        base = _base(cfg, self.layers)
        if not _gc(base, self.gc):
            return False
        top = self.layers - 1
        lora = dict(r=self.r, lora_alpha=2 * self.r, lora_dropout=DROPOUT, task_type="SEQ_CLS")
        if self.kind.startswith("vanilla"):
            targets = _top_regex(self.layers) if self.kind == "vanilla-top" else TARGET_MODULES
            model = get_peft_model(base, LoraConfig(target_modules=targets, **lora))
            if self.kind == "vanilla-frozen":
                for name, param in model.named_parameters():
                    if "lora_" in name and ".layer.{}.".format(top) not in name:
                        param.requires_grad_(False)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            everything = list(range(self.layers))
            schedule = {0: [top], 1: everything} if self.kind == "sched-top" else {0: everything, 1: [top]}
            model = get_peft_model(base, _scheduled_config(schedule, r=self.r))
            # As the README says: the optimizer is built while every preallocated parameter requires grad.
            params = [p for p in model.parameters() if p.requires_grad]
            model.activate_layers(0 if self.kind == "sched-top" else 1)
        model.to(DEVICE)  # parameters keep their identity: the optimizer below still holds them
        model.train()
        self.model = model
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.peak_bytes = []
        return True

    def step(self, batch, clock=time.perf_counter):
        cuda = DEVICE.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
        start = clock()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        took = clock() - start
        if cuda:  # what this step allocated above what every model holds (activations, grads, state)
            self.peak_bytes.append(torch.cuda.max_memory_allocated() - resident)
        return took


def _batch(cfg, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30522, (cfg["batch"], cfg["seq"]), generator=generator)
    labels = torch.randint(0, 2, (cfg["batch"],), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {key: value.to(DEVICE) for key, value in batch.items()}


def _variants(cfg, gc_kinds):
    L = cfg["layers"]
    out = []
    for r in RANKS:
        for kind in ("vanilla-top", "vanilla-all", "vanilla-frozen", "sched-top", "sched-top-trained"):
            out.append(Variant("{} r{} L{}".format(kind, r, L), r, L, kind))
    for r in cfg["big_ranks"]:
        for kind in ("vanilla-top", "sched-top"):
            out.append(Variant("{} r{} L{}".format(kind, r, cfg["big_layers"]), r, cfg["big_layers"], kind))
    for depth in [L] + list(cfg.get("depths", ())):
        for gc in gc_kinds:
            for kind in ("vanilla-top", "vanilla-all", "sched-top"):
                out.append(Variant("{}-gc-{} r8 L{}".format(kind, gc, depth), 8, depth, kind, gc))
    for depth in cfg.get("depths", ()):  # P3 at depth (r8): P4's variants come from the loop above
        for kind in ("vanilla-top", "vanilla-all", "sched-top"):
            name = "{} r8 L{}".format(kind, depth)
            if not any(v.name == name for v in out):
                out.append(Variant(name, 8, depth, kind))
    return out


# ------------------------------------------------------------------------------------- measuring


def _paired(a, b):
    return statistics.median(x / y for x, y in zip(a.times, b.times))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_run_options(parser):
    """--quick, --rounds, --device, --threads, --clock: the options every benchmark here shares."""
    parser.add_argument("--quick", action="store_true", help="small inputs, few rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help="timed rounds")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: this process's CPU time, for a shared machine (with --threads 1)")


def apply_run_options(args, full, quick):
    """Set the device and threads from ``args``; return (the config to run, the clock to time it with)."""
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(quick if args.quick else full)
    if args.rounds:
        cfg["rounds"] = args.rounds
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    return cfg, CLOCKS[args.clock]


def time_variants(variants, cfg, log):
    batch = _batch(cfg)
    clock = CLOCKS[cfg["clock"]]
    for v in variants:
        for _ in range(cfg["warmup"]):
            v.step(batch, clock)
    order = list(variants)
    rng = random.Random(0)
    for i in range(cfg["rounds"]):
        rng.shuffle(order)
        for v in order:
            v.times.append(v.step(batch, clock))
        log("  round {}/{} done".format(i + 1, cfg["rounds"]))


def check_gradients(cfg, gc):
    """Phase {top}, then a switch down to {0, top}: grads with checkpointing vs plain autograd."""
    L = cfg["layers"]
    small = dict(cfg, batch=2)
    batch = _batch(small, seed=3)
    schedule = {0: [L - 1], 1: [0, L - 1]}
    models = []
    for kind in (None, gc):
        base = _base(cfg, L)
        if not _gc(base, kind):
            return None
        model = get_peft_model(base, _scheduled_config(schedule, init_lora_weights=False)).to(DEVICE)
        model.train()
        models.append(model)
    worst = 0.0
    same_set = True
    for t in (0, 1):
        grads = []
        for model in models:
            model.activate_layers(t)
            torch.manual_seed(10 + t)
            model(**batch).loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            model.zero_grad(set_to_none=True)
        ref, got = grads
        same_set = same_set and set(ref) == set(got) and any(".layer.0." in n for n in got) == (t == 1)
        for name in ref:
            if name in got:
                scale = float(ref[name].abs().max()) or 1.0
                worst = max(worst, float((ref[name] - got[name]).abs().max()) / scale)
    return {"max_rel_diff": worst, "same_parameters": same_set, "ok": same_set and worst <= 1e-5}


def callback_overhead(cfg, steps, switch_every):
    """Time spent in LayerScheduleCallback's Trainer events per optimizer step, on a step schedule."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    clock = CLOCKS[cfg["clock"]]
    L = cfg["layers"]
    schedule = {}
    for k, start in enumerate(range(0, steps, switch_every)):
        schedule[start] = [L - 1] if k % 2 == 0 else [L - 2, L - 1]
    base = _base(cfg, L)
    model = get_peft_model(base, _scheduled_config(schedule, schedule_unit="step"))
    out = tempfile.mkdtemp(prefix="layersched_bench_")
    args = TrainingArguments(output_dir=out, report_to="none", per_device_train_batch_size=cfg["batch"])
    state, control = TrainerState(), TrainerControl()
    callback = LayerScheduleCallback()
    callback.on_init_end(args, state, control, model=model)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-4)  # as the Trainer builds it now
    loader = [None] * steps
    spent = 0.0
    switches = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not change over the phase": nothing trains here
        start = clock()
        callback.on_train_begin(args, state, control, model=model, optimizer=optimizer, train_dataloader=loader)
        spent += clock() - start
        for _ in range(steps):
            start = clock()
            callback.on_step_begin(args, state, control, model=model, optimizer=optimizer)
            if hasattr(callback, "on_optimizer_step"):  # Trainer event since transformers 4.42
                callback.on_optimizer_step(args, state, control, model=model, optimizer=optimizer)
            state.global_step += 1
            state.epoch = state.global_step / float(steps)
            callback.on_step_end(args, state, control, model=model, optimizer=optimizer)
            callback.on_log(args, state, control, logs={"loss": 0.0}, model=model)
            took = clock() - start
            spent += took
            if state.global_step % switch_every == 0:
                switches.append(took)
    return {
        "per_step_s": spent / steps,
        "per_switch_s": statistics.median(switches) if switches else 0.0,
        "switch_every": switch_every,
        "steps": steps,
    }


def scheduler_overhead(cfg, steps, switch_every):
    """Time spent in ``LayerScheduler.step()`` per optimizer step (a plain loop's whole per-step cost of the
    package), on a step schedule switching every ``switch_every`` steps, with a per-layer-group optimizer."""
    clock = CLOCKS[cfg["clock"]]
    L = cfg["layers"]
    schedule = {}
    for k, start in enumerate(range(0, steps, switch_every)):
        schedule[start] = [L - 1] if k % 2 == 0 else [L - 2, L - 1]
    model = get_peft_model(_base(cfg, L), _scheduled_config(schedule, schedule_unit="step"))
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-4)
    spent, switches = 0.0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not change over the phase": nothing trains here
        sched = LayerScheduler(model, optimizer, new_layer_warmup_steps=5)
        for _ in range(steps):
            start = clock()
            sched.step()
            took = clock() - start
            spent += took
            if sched.steps % switch_every == 0:
                switches.append(took)
    return {"per_step_s": spent / steps, "per_switch_s": statistics.median(switches) if switches else 0.0,
            "switch_every": switch_every, "steps": steps}


def optimizer_state_check(variant):
    """P6: the sched-top optimizer holds state only for parameters of ever-active layers (and the head)."""
    model = variant.model
    tuner = model.base_model
    ever = set(tuner.ever_active_layers)
    allowed, lora = set(), set()
    for layer, params in tuner.layer_parameters().items():
        for p in params:
            lora.add(id(p))
            if layer in ever:
                allowed.add(id(p))
    state = variant.optimizer.state
    with_state = [p for p in state if len(state[p]) > 0]
    stray = [p for p in with_state if id(p) in lora and id(p) not in allowed]
    lora_with_state = [p for p in with_state if id(p) in lora]
    return {
        "params_with_state": len(with_state),
        "lora_params_with_state": len(lora_with_state),
        "lora_params_of_ever_active_layers": len(allowed),
        "lora_params_preallocated": len(lora),
        "dormant_params_with_state": len(stray),
        "ok": not stray,
    }


def rss_worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rss-worker")
    parser.add_argument("--r", type=int)
    parser.add_argument("--cfg")
    args = parser.parse_args(argv)
    cfg = json.loads(args.cfg)
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    variant = Variant(args.rss_worker, args.r, cfg["layers"], args.rss_worker)
    variant.build(cfg)
    batch = _batch(cfg)
    for _ in range(cfg["rss_steps"]):
        variant.step(batch)
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def measure_rss(cfg, log):
    results = {}
    for r in RANKS:
        for kind in ("vanilla-top", "sched-top"):
            results[(kind, r)] = []
    for i in range(cfg["rss_rounds"]):
        for r in RANKS:
            for kind in ("vanilla-top", "sched-top") if i % 2 == 0 else ("sched-top", "vanilla-top"):
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--rss-worker",
                    kind,
                    "--r",
                    str(r),
                    "--cfg",
                    json.dumps(cfg),
                ]
                out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, universal_newlines=True).stdout
                results[(kind, r)].append(json.loads(out.strip().splitlines()[-1])["maxrss_kb"])
        log("  rss round {}/{} done".format(i + 1, cfg["rss_rounds"]))
    return {"{} r{}".format(kind, r): values for (kind, r), values in results.items()}


# ---------------------------------------------------------------------------------------- report


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_layersched": peft_layersched.__version__,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
    }


def compute_targets(by, cfg, gc_kinds, no_rss, log):
    """P1-P6 from the timed variants ``by`` (name -> Variant), plus the callback and RSS measurements."""
    targets = []

    def ratio(a, b):
        return _paired(by[a], by[b]) if a in by and b in by else None

    def target(key, what, value, limit, note=""):
        ok = None if value is None or limit is None else value <= limit
        targets.append({"target": key, "what": what, "value": value, "limit": limit, "pass": ok, "note": note})

    L, B = cfg["layers"], cfg["big_layers"]
    depths = [L] + list(cfg.get("depths", ()))
    for r in RANKS:
        target(
            "P1",
            "sched-top / vanilla-top, r{} L{}".format(r, L),
            ratio("sched-top r{} L{}".format(r, L), "vanilla-top r{} L{}".format(r, L)),
            1.02,
        )
    for r in cfg["big_ranks"]:
        target(
            "P2",
            "sched-top / vanilla-top, r{} L{}".format(r, B),
            ratio("sched-top r{} L{}".format(r, B), "vanilla-top r{} L{}".format(r, B)),
            1.02,
        )
    for r, depth in [(r, L) for r in RANKS] + [(8, d) for d in depths[1:]]:
        floor = ratio("vanilla-top r{} L{}".format(r, depth), "vanilla-all r{} L{}".format(r, depth))
        value = ratio("sched-top r{} L{}".format(r, depth), "vanilla-all r{} L{}".format(r, depth))
        target(
            "P3",
            "sched-top / vanilla-all, r{} L{}".format(r, depth),
            value,
            None if floor is None else floor * 1.02,
            "" if floor is None else "floor vanilla-top / vanilla-all = {:.3f}".format(floor),
        )
    for gc in gc_kinds:
        for depth in depths:
            value = ratio("sched-top-gc-{} r8 L{}".format(gc, depth), "vanilla-all-gc-{} r8 L{}".format(gc, depth))
            vtop = ratio("vanilla-top-gc-{} r8 L{}".format(gc, depth), "vanilla-all-gc-{} r8 L{}".format(gc, depth))
            note = "" if vtop is None else "vanilla-top-gc / vanilla-all-gc = {:.3f}".format(vtop)
            target("P4", "sched-top-gc-{} / vanilla-all-gc-{}, r8 L{}".format(gc, gc, depth), value, 0.6, note)
        grads = check_gradients(cfg, gc)
        if grads is not None:
            targets.append(
                {
                    "target": "P4",
                    "what": "grads gc-{} vs no checkpointing, lowest active L-1 then 0".format(gc),
                    "value": grads["max_rel_diff"],
                    "limit": 1e-5,
                    "pass": grads["ok"],
                    "note": "same parameters get grads: {}".format(grads["same_parameters"]),
                }
            )
    for r in RANKS:
        for kind, label in (("vanilla-frozen", "usual recipe"), ("sched-top-trained", "frozen-but-trained")):
            value = ratio("{} r{} L{}".format(kind, r, L), "vanilla-top r{} L{}".format(r, L))
            target("info", "{} / vanilla-top, r{} L{} ({})".format(kind, r, L, label), value, None)

    sched_top = by.get("sched-top r8 L{}".format(L))
    step_s = statistics.median(sched_top.times) if sched_top else None
    core = scheduler_overhead(cfg, steps=200, switch_every=10)
    target(
        "P5",
        "LayerScheduler.step() per optimizer step / sched-top step (switch every {} steps)".format(
            core["switch_every"]),
        core["per_step_s"] / step_s if step_s else None,
        0.005,
        "{:.3f} ms per step, {:.2f} ms per switch".format(1e3 * core["per_step_s"], 1e3 * core["per_switch_s"]),
    )
    overhead = callback_overhead(cfg, steps=200, switch_every=10)
    target(
        "P5",
        "callback per optimizer step / sched-top step (switch every {} steps)".format(overhead["switch_every"]),
        overhead["per_step_s"] / step_s if step_s else None,
        0.005,
        "{:.3f} ms per step, {:.2f} ms per switch".format(1e3 * overhead["per_step_s"], 1e3 * overhead["per_switch_s"]),
    )
    if sched_top is not None:
        check = optimizer_state_check(sched_top)
        targets.append(
            {
                "target": "P6",
                "what": "optimizer state only for ever-active parameters (sched-top r8)",
                "value": check["dormant_params_with_state"],
                "limit": 0,
                "pass": check["ok"],
                "note": "{lora_params_with_state} LoRA params with state of {lora_params_preallocated} "
                "preallocated".format(**check),
            }
        )
    if DEVICE.type == "cuda":
        for r in RANKS:
            s_top, v_top = by.get("sched-top r{} L{}".format(r, L)), by.get("vanilla-top r{} L{}".format(r, L))
            if s_top is None or v_top is None:
                continue
            s, v = statistics.median(s_top.peak_bytes), statistics.median(v_top.peak_bytes)
            target(
                "P6",
                "peak CUDA memory of a step sched-top / vanilla-top, r{} L{}".format(r, L),
                s / float(v),
                1.02,
                "{:.1f} MiB vs {:.1f} MiB above the resident models".format(s / 2.0**20, v / 2.0**20),
            )
    rss = None
    if not no_rss:
        log("peak RSS: {} fresh processes per variant".format(cfg["rss_rounds"]))
        rss = measure_rss(cfg, log)
        for r in RANKS:
            s = statistics.median(rss["sched-top r{}".format(r)])
            v = statistics.median(rss["vanilla-top r{}".format(r)])
            target(
                "P6",
                "peak RSS sched-top / vanilla-top, r{} L{}".format(r, L),
                s / float(v),
                1.02,
                "{:.0f} MiB vs {:.0f} MiB".format(s / 1024.0, v / 1024.0),
            )

    return targets, overhead, rss


def machine_line(info):
    """One line of what :func:`machine` found, for the head of a benchmark's output."""
    return (
        "machine: {cpu} ({cpu_count} cores, {torch_threads} torch threads), GPU {gpu}, Python {python}, "
        "torch {torch}, transformers {transformers}, peft {peft}; load average {loadavg}".format(**info)
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, few rounds (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH ('-': stdout)")
    parser.add_argument("--rounds", type=int, help="timed rounds per variant (default 9, quick 5)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, for a machine shared "
        "with other jobs (use with --threads 1, so that no thread waits on another)",
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses (P6 memory)")
    parser.add_argument("--no-big", action="store_true", help="skip the L=48 variants (P2)")
    parser.add_argument("--no-gc", action="store_true", help="skip gradient checkpointing (P4)")
    parser.add_argument(
        "--depths",
        default="",
        help="comma-separated extra model depths for P3/P4 (r8), e.g. 24,48: how the cost grows with depth",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: on a GPU, peak CUDA memory per step replaces peak RSS (P6 memory)",
    )
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        args.no_rss = True
    cfg = dict(QUICK if args.quick else FULL)
    cfg["device"] = str(DEVICE)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg["threads"] = torch.get_num_threads()
    cfg["clock"] = args.clock
    cfg["depths"] = [int(d) for d in args.depths.split(",") if d.strip()]
    quiet = args.json == "-"

    def log(msg):
        print(msg, file=sys.stderr if quiet else sys.stdout)
        (sys.stderr if quiet else sys.stdout).flush()

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    info = machine()
    log(machine_line(info))
    log("config: {}".format({k: v for k, v in cfg.items() if k != "big_ranks"}))
    if info["loadavg"] and info["loadavg"][0] > (os.cpu_count() or 1) * 0.5 and args.clock == "wall":
        log(
            "note: the machine is busy (load average {:.1f}); --clock cpu --threads 1 measures work, not "
            "waiting".format(info["loadavg"][0])
        )

    gc_kinds = [] if args.no_gc else ["nr", "re"]
    variants = _variants(cfg, gc_kinds)
    if args.no_big:
        variants = [v for v in variants if v.layers != cfg["big_layers"] or v.layers in cfg["depths"]]
    built = []
    for v in variants:
        if v.build(cfg):
            built.append(v)
        else:
            log("  skipped {} (this transformers has no such checkpointing)".format(v.name))
    log("built {} variants; timing {} rounds".format(len(built), cfg["rounds"]))
    time_variants(built, cfg, log)
    by = {v.name: v for v in built}

    rows = []
    for v in built:
        t = sorted(v.times)
        rows.append(
            {
                "variant": v.name,
                "median_ms": 1e3 * statistics.median(t),
                "min_ms": 1e3 * t[0],
                "max_ms": 1e3 * t[-1],
                "n": len(t),
            }
        )

    targets, overhead, rss = compute_targets(by, cfg, gc_kinds, args.no_rss, log)

    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {"machine": info, "config": cfg, "variants": rows, "targets": targets, "rss_kb": rss, "callback": overhead}
    text = format_report(report)
    if not quiet:
        print(text)
    else:
        log(text)
    if args.json:
        payload = json.dumps(report, indent=2, default=str)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload + "\n")
    failed = [t for t in targets if t["pass"] is False]
    return 1 if failed else 0


def format_report(report):
    lines = ["", "| variant | median ms | min | max | steps |", "|---|---:|---:|---:|---:|"]
    for row in report["variants"]:
        lines.append("| {variant} | {median_ms:.1f} | {min_ms:.1f} | {max_ms:.1f} | {n} |".format(**row))
    lines += ["", "| target | measured | value | limit | result |", "|---|---|---:|---:|---|"]
    for t in report["targets"]:
        value = (
            "-"
            if t["value"] is None
            else (
                "{:.2e}".format(t["value"])
                if t["target"] == "P4" and "grads" in t["what"]
                else "{:.4g}".format(t["value"])
            )
        )
        limit = (
            ""
            if t["limit"] is None
            else ("{:.0e}".format(t["limit"]) if t["limit"] and t["limit"] < 1e-3 else "{:.4g}".format(t["limit"]))
        )
        result = {True: "pass", False: "FAIL", None: ""}[t["pass"]]
        what = t["what"] + (" ({})".format(t["note"]) if t["note"] else "")
        lines.append("| {} | {} | {} | {} | {} |".format(t["target"], what, value, limit, result))
    return "\n".join(lines)


if __name__ == "__main__":
    if "--rss-worker" in sys.argv:
        warnings.filterwarnings("ignore")
        rss_worker(sys.argv[1:])
    else:
        sys.exit(main())
