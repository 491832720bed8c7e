"""axolotl as a client: ``plugins: [peft_layersched.integrations.axolotl.LayerSchedulePlugin]``,
``adapter: scheduled_lora`` and ``layer_schedule:`` in its YAML (examples/axolotl/layer_schedule.yml).

The training test runs axolotl's own entry point (``python -m axolotl.cli.train config.yml``) in a process
of its own on a tiny LLaMA; the config tests run axolotl's config loader (``axolotl.cli.config.load_cfg``:
plugin import by dotted name, the plugin's args merged into axolotl's pydantic model, validation) and its
adapter loader (``axolotl.loaders.adapter.load_adapter``) in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_models

# axolotl's telemetry (posthog) waits at interpreter exit to flush its events to a server this machine cannot
# reach: opt out before axolotl is imported (here and in the training subprocess).
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest.importorskip(
    "axolotl.integrations.base", reason="axolotl is installed only in the axolotl tox env (tox -e axolotl)"
)
yaml = pytest.importorskip("yaml", reason="axolotl's PyYAML dependency is missing")

from peft_layersched import ScheduledLoraConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "axolotl", "layer_schedule.yml")
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "a", "big", "red", "ball"]


def _tokenizer():
    # No hub: a word-level tokenizer over the toy vocabulary, built on the fly.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[BOS]": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]"
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny LLaMA (4 layers) with its tokenizer, a toy JSONL data set, and the example config pointed at them."""
    root = tmp_path_factory.mktemp("axolotl")
    model = tiny_models.llama()
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 2, 3
    model.save_pretrained(str(root / "model"))
    _tokenizer().save_pretrained(str(root / "model"))
    with open(str(root / "data.jsonl"), "w") as f:
        for i in range(32):
            f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(8))}) + "\n")
    return root


def _config(workdir, name, **overrides):
    with open(EXAMPLE) as f:
        cfg = yaml.safe_load(f)
    cfg["base_model"] = str(workdir / "model")
    cfg["datasets"][0]["path"] = str(workdir / "data.jsonl")
    cfg["dataset_prepared_path"] = str(workdir / "prepared")
    cfg["output_dir"] = str(workdir / name)
    for key, value in overrides.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return cfg


def _initial_adapter(cfg):
    # The adapters as get_peft_model creates them: with init_seed their values depend only on (seed, module name).
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    config = ScheduledLoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["lora_target_modules"],
        layer_schedule=cfg["layer_schedule"], schedule_unit=cfg["schedule_unit"],
        preallocate_layers=cfg["preallocate_layers"], init_seed=cfg["init_seed"], task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_models.llama(), config)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _layer_weights(weights, layer):
    return {k: v for k, v in weights.items() if ".layers.{}.".format(layer) in k}


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(str(folder), "adapter_model.safetensors"))


def _train(workdir, name, **overrides):
    """``python -m axolotl.cli.train`` on the example config (with ``overrides``); returns the output folder."""
    cfg = _config(workdir, name, **overrides)
    path = workdir / "{}.yml".format(name)
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, DO_NOT_TRACK="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(path)], cwd=str(workdir), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-6000:]
    return cfg, workdir / name


def _check_switches_and_lrs(out):
    with open(str(out / "checkpoint-5" / "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    switches = [(e["step"], e["active_layers"]) for e in history if "schedule_time" in e]
    assert switches == [(0, "3"), (2, "0,3")]
    # layer_schedule_callback's new_layer_lr_scale reached the callback: layer 0 joined at half the LR
    lrs = [(e["step"], e["layer_schedule/lr/0"], e["layer_schedule/lr/3"])
           for e in history if "layer_schedule/lr/0" in e]
    assert [s for s, _, _ in lrs] == [1, 2, 3, 4, 5]
    assert [(lr0, lr3) for s, lr0, lr3 in lrs if s >= 3] == [(0.005, 0.01)] * 3
    assert all(lr0 == 0 for s, lr0, _ in lrs if s <= 2)


def test_axolotl_train_runs_the_schedule(workdir):
    cfg, out = _train(workdir, "train")
    _check_switches_and_lrs(out)

    initial = _initial_adapter(cfg)
    assert set(_adapter(out)) == set(initial)
    for step in (1, 2, 5):
        weights = _adapter(out / "checkpoint-{}".format(step))
        for layer in (0, 1, 3):
            frozen = layer == 1 or (layer == 0 and step <= 2)
            b_changed = [k for k, v in _layer_weights(weights, layer).items()
                         if "lora_B" in k and not torch.equal(v, initial[k])]
            if frozen:
                # not scheduled yet (or never): every LoRA weight of the layer bitwise as initialized
                assert all(torch.equal(v, initial[k]) for k, v in _layer_weights(weights, layer).items()), (
                    "layer {} changed by step {} although it was frozen".format(layer, step))
            else:
                assert len(b_changed) == 2, "layer {} did not train by step {}".format(layer, step)

    with open(str(out / "adapter_config.json")) as f:
        saved = json.load(f)
    assert saved["peft_type"] == "SCHEDULED_LORA"
    assert saved["layer_schedule"] == {"0": [3], "2": [0, 3]}
    assert saved["schedule_unit"] == "step"
    assert saved["preallocate_layers"] == [0, 1, 3]
    assert saved["ever_active_layers"] == [0, 3]
    assert saved["schedule_position"] == 5
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]

    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_models.llama(), str(out))
    assert type(loaded.base_model).__name__ == "ScheduledLoraModel"
    assert isinstance(loaded.peft_config["default"], ScheduledLoraConfig)


def test_axolotl_lora_with_a_layer_schedule_is_adopted_by_the_callback(workdir):
    # adapter: lora: axolotl builds its plain LoRA on every layer (q_proj/v_proj of layers 0-3); the callback
    # adopts it (bring your own LoRA) and the schedule picks which of those layers train.
    _, out = _train(workdir, "lora", adapter="lora", preallocate_layers=None, init_seed=None)
    _check_switches_and_lrs(out)
    first = _adapter(out / "checkpoint-1")
    assert {k.split(".layers.")[1].split(".")[0] for k in first} == {"0", "1", "2", "3"}
    for step in (1, 2, 5):
        weights = _adapter(out / "checkpoint-{}".format(step))
        for layer in range(4):
            frozen = layer in (1, 2) or (layer == 0 and step <= 2)
            mine = _layer_weights(weights, layer)
            b_zero = [torch.count_nonzero(v).item() == 0 for k, v in mine.items() if "lora_B" in k]
            assert len(b_zero) == 2
            if frozen:
                # PEFT initialises lora_B to zero; a frozen layer keeps A and B exactly as they were at step 1
                assert all(b_zero), "layer {} trained by step {} although it was frozen".format(layer, step)
                assert all(torch.equal(v, first[k]) for k, v in mine.items())
            else:
                assert not any(b_zero), "layer {} did not train by step {}".format(layer, step)
    with open(str(out / "adapter_config.json")) as f:
        saved = json.load(f)
    # saving writes what is needed to continue the schedule
    assert saved["layer_schedule"] == {"0": [3], "2": [0, 3]} and saved["schedule_unit"] == "step"
    assert saved["ever_active_layers"] == [0, 3] and saved["schedule_position"] == 5
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(tiny_models.llama(), str(out))
    assert type(loaded.base_model).__name__ == "ScheduledLoraModel"


def _load_cfg(workdir, name, **overrides):
    from axolotl.cli.config import load_cfg
    from axolotl.utils.dict import DictDefault

    return load_cfg(DictDefault(_config(workdir, name, **overrides)))


def test_plugin_is_an_axolotl_plugin_with_a_lora_like_adapter():
    from axolotl.integrations.base import BasePlugin, load_plugin

    from peft_layersched.integrations.axolotl import LayerSchedulePlugin

    plugin = load_plugin("peft_layersched.integrations.axolotl.LayerSchedulePlugin")
    assert isinstance(plugin, LayerSchedulePlugin) and isinstance(plugin, BasePlugin)
    (capability,) = plugin.get_adapter_capabilities()
    assert (capability.name, capability.lora_like, capability.relora) == ("scheduled_lora", True, False)


def test_axolotl_lora_kwargs_reach_the_scheduled_config(workdir):
    # DPO/KTO path: axolotl asks only for the config (config_only=True) and lets TRL build the model.
    from axolotl.loaders.adapter import load_adapter

    cfg = _load_cfg(workdir, "config-only", lora_target_modules=None, lora_target_linear=True, peft_use_rslora=True)
    assert cfg.layer_schedule == {0: [3], 2: [0, 3]}
    model, config = load_adapter(tiny_models.llama(), cfg, cfg.adapter, config_only=True)
    assert model is None
    assert isinstance(config, ScheduledLoraConfig)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.use_rslora is True and config.r == 4 and config.lora_alpha == 8
    assert config.layer_schedule == {0: [3], 2: [0, 3]} and config.schedule_unit == "step"
    assert config.preallocate_layers == [0, 1, 3] and config.init_seed == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"adapter": None}, r"given with adapter: None; they need adapter: scheduled_lora .* or adapter: lora / qlora"),
        ({"layer_schedule": None}, r"adapter: scheduled_lora needs a layer_schedule, e\.g\."),
        ({"load_in_8bit": True}, r"cannot be combined with load_in_8bit yet: .* Use adapter: qlora"),
        ({"layer_schedule": {0: [3], 2: "top"}}, r"layer_schedule\[2\]: expected a list of layer ids, got 'top'"),
        ({"schedule_unit": "steps"}, r"steps"),
        ({"layer_schedule_callback": {"lr_scale": 0.5}}, r"unknown option\(s\) lr_scale; valid: new_layer_lr_scale"),
        ({"layer_schedule_callback": {"layer_schedule": {0: [1]}}}, r"unknown option\(s\) layer_schedule"),
        ({"layer_schedule_callback": {"frozen_optimizer_state": "free"}}, r"frozen_optimizer_state"),
        ({"adapter": "lora"}, r"preallocate_layers, init_seed given with adapter: lora: axolotl's lora puts LoRA on "
                              r"every layer .* Use adapter: scheduled_lora"),
        ({"adapter": "lora", "layer_schedule": None, "preallocate_layers": None, "init_seed": None},
         r"schedule_unit, layer_schedule_callback given with adapter: lora but no layer_schedule"),
        ({"adapter": "lora", "preallocate_layers": None, "init_seed": None, "schedule_unit": "steps"}, r"steps"),
    ],
    ids=["no-adapter", "no-schedule", "8bit", "bad-schedule", "bad-unit", "unknown-option", "schedule-as-option",
         "bad-option", "lora-preallocate", "lora-no-schedule", "lora-bad-unit"],
)
def test_config_errors_say_what_to_fix(workdir, overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _load_cfg(workdir, "errors", **overrides)


def test_relora_is_refused_by_axolotl_for_the_scheduled_adapter(workdir):
    with pytest.raises(ValueError, match="ReLoRA|relora"):
        _load_cfg(workdir, "relora", relora=True, jagged_restart_steps=2)


DOCS_PAGE = os.path.join(ROOT, "docs", "integrations", "axolotl.md")

pytestmark = pytest.mark.slow  # axolotl's train entry point, in processes of their own
# the example config's keys that are not axolotl's model / data / training setup
_ADAPTER_KEYS = ("plugins", "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "layer_schedule",
                 "schedule_unit", "preallocate_layers", "init_seed", "layer_schedule_callback")


def _docs_yaml_blocks():
    import re

    with open(DOCS_PAGE) as f:
        return [yaml.safe_load(block) for block in re.findall(r"^```yaml\n(.*?)^```", f.read(), re.M | re.S)]


@pytest.mark.parametrize("number", range(len(_docs_yaml_blocks())))
def test_the_docs_yaml_examples_load_in_axolotl_and_reach_the_schedule(workdir, number):
    from axolotl.loaders.adapter import load_adapter

    from peft_layersched.integrations.axolotl import LayerSchedulePlugin

    block = _docs_yaml_blocks()[number]
    cfg = _load_cfg(workdir, "docs-{}".format(number), **dict({key: None for key in _ADAPTER_KEYS}, **block))
    (callback,) = LayerSchedulePlugin().add_callbacks_pre_trainer(cfg, None)
    _, config = load_adapter(tiny_models.llama(), cfg, cfg.adapter, config_only=True)
    if block["adapter"] == "scheduled_lora":
        assert isinstance(config, ScheduledLoraConfig)
        assert config.layer_schedule == block["layer_schedule"] and config.schedule_unit == block["schedule_unit"]
        assert config.preallocate_layers == block["preallocate_layers"]
        assert callback.new_layer_lr_scale == block["layer_schedule_callback"]["new_layer_lr_scale"]
    else:
        # axolotl's own LoraConfig; the callback carries the schedule and adopts the LoRA at on_init_end
        assert not isinstance(config, ScheduledLoraConfig)
        from transformers import TrainingArguments

        model = load_adapter(tiny_models.llama(), cfg, cfg.adapter)[0]
        args = TrainingArguments(str(workdir / "docs-args"), use_cpu=True, report_to=[])
        callback.on_init_end(args, None, None, model=model)
        assert type(model.base_model).__name__ == "ScheduledLoraModel"
        stored = model.peft_config["default"].layer_schedule  # the typed spec with its defaults filled in
        assert {key: stored[key] for key in block["layer_schedule"]} == block["layer_schedule"]
