"""save_pretrained -> PeftModel.from_pretrained (continue training / inference), and export_lora to a plain
LoRA adapter that vanilla PEFT loads in a process where peft_layersched cannot be imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from packaging.version import Version
from peft import PeftModel, get_peft_model

from peft_layersched import _compat, export_lora
from peft_layersched.tuner import deferred_load_check
from peft_layersched.tuner.model import ScheduledLoraModel

from helpers.scheduled_cases import BY_FAMILY, CASES, PREFIX, logits, lora_params, loss, perturb, trainable
from helpers.snapshots import lora

PEFT = Version(Version(peft.__version__).base_version)


def _read_json(folder, name="adapter_config.json"):
    with open(os.path.join(folder, name)) as handle:
        return json.load(handle)


def _read_weights(folder):
    files = sorted(f for f in os.listdir(folder) if f.startswith("adapter_model."))
    assert len(files) == 1, files
    path = os.path.join(folder, files[0])
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return files[0], load_file(path)
    return files[0], torch.load(path)


def _lora_keys(module_names):
    return sorted("{}{}.lora_{}.weight".format(PREFIX, name, ab) for name in module_names for ab in "AB")


def _spare_prealloc(case):
    return [case.raw_spare, case.raw_low, case.raw_top]


@pytest.mark.parametrize("saved_at", [0, 2], ids=["saved in phase 0", "saved in phase 2"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_save_then_from_pretrained_continues_the_schedule(case, saved_at, tmp_path):
    # init_lora_weights=False: the never-active spare has B != 0, so a bypass lost on load shows in the output.
    model = case.build(preallocate_layers=_spare_prealloc(case), init_lora_weights=False)
    for t in sorted({0, saved_at}):
        model.activate_layers(t)
        perturb(model)
    ever = case.first if saved_at == 0 else case.later
    expected, weights = logits(model, case), lora(model)
    model.save_pretrained(str(tmp_path))
    assert model.peft_config["default"].peft_type == "LORA"  # saving does not change the running tuner

    written = _read_json(str(tmp_path))
    assert written["peft_type"] == "SCHEDULED_LORA"
    assert written["layer_schedule"] == {str(k): v for k, v in case.schedule.items()}
    assert (written["ever_active_layers"], written["init_seed"]) == (ever, 0)
    _, state = _read_weights(str(tmp_path))
    assert sorted(state) == _lora_keys(model.scheduled_modules())  # every preallocated adapter, active or not

    loaded = PeftModel.from_pretrained(case.base(), str(tmp_path), is_trainable=True)
    assert isinstance(loaded.base_model, ScheduledLoraModel)
    config = loaded.peft_config["default"]
    assert config.layer_schedule == model.peft_config["default"].layer_schedule
    assert all(type(start) is int for start in config.layer_schedule)
    assert (config.init_seed, config.ever_active_layers) == (0, ever)
    assert loaded.preallocated_layers == model.preallocated_layers
    assert loaded.scheduled_modules() == model.scheduled_modules()
    assert loaded.ever_active_layers == ever
    assert all(torch.equal(value, weights[name]) for name, value in lora(loaded).items())
    assert torch.equal(logits(loaded, case), expected)
    assert trainable(loaded) == sorted(lora_params(loaded))  # as after get_peft_model: all registered

    # Continue: the schedule goes on, and a step trains exactly the active layers.
    assert loaded.activate_layers(3) == case.later
    assert loaded.ever_active_layers == case.later
    assert trainable(loaded) == sorted(n for n in lora_params(loaded) if case.layer_of(n) in case.later)
    optimizer = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    before = lora(loaded)
    loaded.train()
    loss(loaded, case, seed=0).backward()
    optimizer.step()
    changed = sorted(n for n, p in lora_params(loaded).items() if not torch.equal(p, before[n]))
    assert changed == trainable(loaded)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_inference_load_matches_and_trains_nothing(case, tmp_path):
    model = case.build(preallocate_layers=_spare_prealloc(case), init_lora_weights=False)
    model.activate_layers(0)
    perturb(model)
    expected = logits(model, case)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(case.base(), str(tmp_path))
    assert isinstance(loaded.base_model, ScheduledLoraModel)
    assert torch.equal(logits(loaded, case), expected)
    assert trainable(loaded) == []
    assert loaded.activate_layers(2) == case.later
    assert trainable(loaded) == []


def _not_loaded_warnings(caught):
    return [str(w.message) for w in caught if "no LoRA adapter there" in str(w.message)]


def _from_pretrained(case, folder):
    return PeftModel.from_pretrained(case.base(), folder), "default"


def _load_as_second_adapter(case, folder):
    model = get_peft_model(case.base(), case.config(layer_schedule={0: [case.raw_spare]}))
    model.load_adapter(folder, adapter_name="second")
    return model, "second"


LOADERS = [
    pytest.param(_from_pretrained, id="from_pretrained"),
    # PEFT 0.5 / 0.6's PeftModel.add_adapter hands the PeftModel itself to inject_adapter, which a scheduled
    # second adapter does not survive (module names taken relative to the PeftModel); LoraConfig does.
    pytest.param(_load_as_second_adapter, id="load_adapter", marks=pytest.mark.skipif(
        Version("0.5") <= PEFT < Version("0.7"),
        reason=f"PEFT {peft.__version__}: PeftModel.add_adapter injects into the PeftModel (0.5 / 0.6)")),
]


@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_saved_weights_of_layers_the_config_no_longer_preallocates_warn_on_load(case, load, tmp_path):
    # low and top train; the spare stays at its init (lora_B zero), so only low is worth a warning.
    model = case.build(preallocate_layers=_spare_prealloc(case))
    model.activate_layers(2)
    perturb(model)
    weights = lora(model)
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(case, str(tmp_path))
    assert _not_loaded_warnings(caught) == []  # as saved, every weight finds its module

    written = _read_json(str(tmp_path))
    written.update(layer_schedule={"0": [case.raw_top]}, preallocate_layers=None, ever_active_layers=[case.top])
    with open(os.path.join(str(tmp_path), "adapter_config.json"), "w") as handle:
        json.dump(written, handle)
    match = r"trained LoRA weights \(lora_B is not zero\) for layer\(s\) {}, but the model has no LoRA adapter".format(
        re.escape(str([case.low]))
    )
    with pytest.warns(UserWarning, match=match):
        loaded, name = load(case, str(tmp_path))
    assert loaded.base_model.scheduled_adapter(name).preallocated_layers == [case.top]
    own = ".{}.".format(name)
    kept = {key.replace(own, ".default."): value for key, value in lora(loaded).items() if own in key}
    assert kept and all(torch.equal(value, weights[key]) for key, value in kept.items())


# ------------------------------------------------------------------------------------------- export

# (case id, family, config kwargs, activate_layers calls, export kwargs, ever-active layers, modules whose
# modules_to_save copy is exported)
EXPORTS = [
    ("bert", "bert", dict(task_type="SEQ_CLS"), [0, 2], {}, [1, 11], ["classifier"]),
    ("bert .bin", "bert", {}, [0], dict(safe_serialization=False), [11], []),
    ("gpt2", "gpt2", {}, [0], {}, [3], []),
    ("llama", "llama", {}, [0, 2, 0], {}, [1, 3], []),
    ("llama lm_head", "llama", dict(modules_to_save=["lm_head"]), [0], {}, [3], ["lm_head"]),
    ("t5", "t5", {}, [2], {}, ["encoder.1", "decoder.1"], []),
]
EXPORT_IDS = [c[0] for c in EXPORTS]
ROWS = {c[0]: c[1:] for c in EXPORTS}

_VANILLA = r"""
import importlib.abc, json, sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "peft_layersched":
            raise ImportError("peft_layersched is blocked in this process")


sys.meta_path.insert(0, Block())
try:
    import peft_layersched  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("peft_layersched was importable")

import torch
import transformers
from peft import PeftModel

results = {}
for job in json.load(open(sys.argv[1])):
    base = getattr(transformers, job["model_class"]).from_pretrained(job["base"])
    model = PeftModel.from_pretrained(base, job["adapter"]).eval()
    with torch.no_grad():
        out = model(**torch.load(job["inputs"])).logits
    expected = torch.load(job["expected"])
    peft_type = model.peft_config["default"].peft_type
    results[job["id"]] = {
        "tuner": type(model.base_model).__name__,
        "peft_type": str(getattr(peft_type, "value", peft_type)),
        "lora_modules": sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_A." in n}),
        "max_abs_diff": float((out - expected).abs().max()),
        "exact": bool(torch.equal(out, expected)),
    }
assert not any(name.split(".")[0] == "peft_layersched" for name in sys.modules)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every EXPORTS row exported: ``({case id: (model, config, folder)}, the jobs file for vanilla PEFT)``."""
    root = tmp_path_factory.mktemp("exports")
    made, jobs = {}, []
    for case_id, family, kwargs, times, export_kwargs, _, _ in EXPORTS:
        case = BY_FAMILY[family]
        folder = root / case_id.replace(" ", "_")
        model = case.build(preallocate_layers=_spare_prealloc(case), init_lora_weights=False, **kwargs)
        for t in times:
            model.activate_layers(t)
            perturb(model)
        # modules_to_save: their trained copy must travel too.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.add_(0.1)
        expected = logits(model, case)
        config = export_lora(model, str(folder / "adapter"), **export_kwargs)
        base = case.base()
        base.save_pretrained(str(folder / "base"))
        torch.save(case.inputs(), str(folder / "inputs.pt"))
        torch.save(expected, str(folder / "expected.pt"))
        made[case_id] = (model, config, str(folder / "adapter"))
        jobs.append(
            dict(
                id=case_id,
                model_class=type(base).__name__,
                base=str(folder / "base"),
                adapter=str(folder / "adapter"),
                inputs=str(folder / "inputs.pt"),
                expected=str(folder / "expected.pt"),
            )
        )
    with open(str(root / "jobs.json"), "w") as handle:
        json.dump(jobs, handle)
    return made, str(root / "jobs.json")


@pytest.fixture(scope="module")
def vanilla_loads(exports):
    """Every export loaded by vanilla PEFT in one subprocess (its imports cost ~10 s)."""
    jobs = exports[1]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [sys.executable, "-c", _VANILLA, jobs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        cwd=os.path.dirname(jobs),
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", EXPORT_IDS)
def test_export_writes_plain_lora_of_ever_active_modules(exports, case_id):
    family, kwargs, _, export_kwargs, ever, saved = ROWS[case_id]
    model, config, folder = exports[0][case_id]
    assert model.ever_active_layers == ever
    kept = BY_FAMILY[family].target_names(ever)
    written = _read_json(folder)
    assert written["peft_type"] == "LORA"
    assert sorted(written["target_modules"]) == kept  # exact full names, never-active layers left out
    assert sorted(config.target_modules) == kept
    assert not {"layer_schedule", "ever_active_layers", "init_seed", "preallocate_layers"} & set(written)
    # SEQ_CLS: PEFT adds the head itself (to the config from 0.4 on); the weights below must hold it.
    assert set(kwargs.get("modules_to_save", [])) <= set(written["modules_to_save"] or [])
    assert written["task_type"] == kwargs.get("task_type")
    name, state = _read_weights(folder)
    safe = export_kwargs.get("safe_serialization", _compat.PEFT_READS_SAFETENSORS)
    assert name == ("adapter_model.safetensors" if safe else "adapter_model.bin")
    assert sorted(k for k in state if ".lora_" in k) == _lora_keys(kept)
    assert {k[len(PREFIX) :].split(".")[0] for k in state if ".lora_" not in k} == set(saved)


@pytest.mark.slow  # vanilla PEFT in a process of its own
@pytest.mark.parametrize("case_id", EXPORT_IDS)
def test_export_loads_in_vanilla_peft_without_this_package(vanilla_loads, case_id):
    family, _, _, _, ever, _ = ROWS[case_id]
    result = vanilla_loads[case_id]
    assert result["tuner"] == "LoraModel"
    assert result["peft_type"] == "LORA"
    assert result["lora_modules"] == [PREFIX + n for n in BY_FAMILY[family].target_names(ever)]
    assert result["max_abs_diff"] <= 1e-6, result


def test_deferred_load_check_puts_off_the_check_of_the_model_it_names_only():
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    case = BY_FAMILY["bert"]
    trained = case.build()
    trained.activate_layers(2)
    perturb(trained)  # layers low and top carry trained weights
    state = get_peft_model_state_dict(trained)
    fresh, other = case.build(), case.build()
    fresh.activate_layers(0)  # the schedule says layer low never trained

    def load(into, deferred_for):
        with warnings.catch_warnings(record=True) as caught, deferred_load_check(deferred_for):
            warnings.simplefilter("always")
            set_peft_model_state_dict(into, state)
        return [str(w.message) for w in caught if "never trained" in str(w.message)]

    assert len(load(fresh, other)) == 1  # another model's deferral leaves this one checked at once
    assert load(fresh, fresh) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.base_model.scheduled_adapter().check_deferred_load()
        fresh.base_model.scheduled_adapter().check_deferred_load()  # once: the put-off check is done
    assert [str(w.message) for w in caught if "never trained" in str(w.message)] == [
        "adapter 'default': layer(s) [1] carry trained LoRA weights (lora_B is not zero), but the config's "
        "layer_schedule / ever_active_layers ([11]) say they never trained, so they are left out of the forward. "
        "If they did train, add them to ever_active_layers in adapter_config.json ('peft-layersched inspect' "
        "shows the mismatch)."
    ]
