"""``peft-layersched plan`` / ``inspect``: ``cli.main`` in this process, its output checked against the
library (the main flows, the error table, the registry), and one run of the installed console script."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_layersched import ScheduledLoraConfig, cli

from helpers import tiny_models

pytestmark = pytest.mark.usefixtures("transformers_logging_restored")


def console_script():
    """The ``peft-layersched`` script of this interpreter's environment; ``python -m peft_layersched.cli``
    (which the demo's subprocess test runs too) where the package is only on the path, not installed."""
    script = os.path.join(os.path.dirname(sys.executable), "peft-layersched")
    if os.path.isfile(script):
        return [script]
    assert os.environ.get("EXPECT_PACKAGE_INSTALLED") != "1", f"the package is installed but {script} is missing"
    return [sys.executable, "-m", "peft_layersched.cli"]


def run_cli(capsys, *args):
    """``cli.main(args)`` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_json(path, data):
    with open(str(path), "w") as handle:
        json.dump(data, handle)
    return str(path)


GRADUAL = {"type": "gradual", "k": 1, "n": 1, "every": 2, "from": "top", "limit": 3}


@pytest.mark.slow  # a process of its own
def test_plan_shows_stacks_targets_timeline_and_phases(tmp_path, config_folders):
    # The installed entry point in a process of its own (cwd: a temporary folder, so that nothing next to
    # the test is imported by accident); every other test calls cli.main.
    fields = {"target_modules": ["query", "value"], "r": 4, "layer_schedule": GRADUAL}
    config = write_json(tmp_path / "gradual.json", fields)
    result = subprocess.run(
        console_script() + ["plan", "--model", config_folders["bert6"], "--config", config, "--epochs", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "BertForSequenceClassification" in out and "built on meta" in out
    assert "bert.encoder.layer: 6 layers (ids 0..5)" in out
    assert "layers 3-5  attention.self.query, attention.self.value" in out
    grid = {int(line.split()[1]): line.split()[2:] for line in out.splitlines() if line.startswith("  layer ")}
    assert grid[5] == list("#######")
    assert grid[4] == list("..#####")
    assert grid[3] == list("....###")
    assert grid[2] == grid[1] == grid[0] == []  # no adapter: blank row
    phases = [line.split() for line in out.split("phases:")[1].splitlines() if line.strip()]
    assert phases[1:] == [["0-1", "5", "512"], ["2-3", "4-5", "1,024"], ["4-6", "3-5", "1,536"]]


def test_plan_json_is_what_the_library_does(tmp_path, capsys, config_folders):
    spec = {"type": "cyclic", "block": 2, "every": 3, "order": "random", "seed": 4}
    fields = {"target_modules": ["query", "value"], "r": 4, "layer_schedule": spec, "schedule_unit": "step"}
    config = write_json(tmp_path / "cyclic.json", dict(fields, task_type="SEQ_CLS"))
    code, out, err = run_cli(capsys, "plan", "--model", config_folders["bert6"], "--config", config, "--steps", 20,
                             "--json")
    assert code == 0, err
    plan = json.loads(out)
    # The same config on a real (CPU) model, driven by the library itself.
    model = get_peft_model(tiny_models.bert(num_layers=6), ScheduledLoraConfig(**dict(fields, task_type="SEQ_CLS")))
    assert plan["timeline"] == [model.activate_layers(t) for t in range(20)]
    assert plan["preallocated_layers"] == model.preallocated_layers == [0, 1, 2, 3, 4, 5]
    assert plan["stacks"] == [{"name": "bert.encoder.layer", "path": "bert.encoder.layer", "length": 6}]
    assert plan["schedule"]["layer_schedule"] == dict(spec, type="cyclic")
    sizes = {layer: sum(p.numel() for p in ps) for layer, ps in model.base_model.layer_parameters().items()}
    assert [layer["lora_params"] for layer in plan["layers"]] == [sizes[i] for i in range(6)]
    for phase in plan["phases"]:
        assert phase["active"] == plan["timeline"][phase["start"]] == plan["timeline"][phase["end"]]
        assert phase["trainable_lora_params"] == sum(sizes[layer] for layer in phase["active"])
    assert [phase["start"] for phase in plan["phases"]] == list(range(0, 20, 3))


# (case id, config fields, extra arguments, regex of the message on stderr): each exits 1 with the library's
# message and no traceback.
PLAN_ERRORS = [
    (
        "layer out of range",
        {"layer_schedule": {"0": [6]}},
        [],
        r"plan: error: layer_schedule\[0\]: layer 6 is out of range(?s:.*)valid indices are 0\.\.5 or -6\.\.-1",
    ),
    ("steps on an epoch schedule", {"layer_schedule": {"0": [1]}}, ["--steps", "5"], r"counts epochs; use --epochs"),
    ("typo field", {"layer_shedule": {"0": [1]}}, [], r"unknown ScheduledLoraConfig field\(s\) \['layer_shedule'\]"),
    ("unknown type", {"layer_schedule": {"type": "linear"}}, [], r"'type' must be one of \['gradual', 'cyclic'"),
    ("k too large", {"layer_schedule": {"type": "sampled", "k": 9}}, [], r"'k' is 9 but there are only 6 candidate"),
    ("no model", {"layer_schedule": {"0": [1]}}, ["--model", "nowhere"], r"--model nowhere: not a config.json file"),
    (
        # a name that is no folder, no model type and no Hub model this (offline) machine can read
        "model name close to a type",
        {"layer_schedule": {"0": [1]}},
        ["--model", "bert-base"],
        r"--model bert-base: .*not a transformers model type(?s:.*)Did you mean the model type 'bert'\?"
        r".*google-bert/bert-base-uncased",
    ),
    (
        "inline JSON that does not parse",
        None,
        ["--config", '{"target_modules": ["query"],}'],
        r"--config: inline JSON that does not parse \(.*\); quote the whole object for the shell",
    ),
    (
        "inline JSON, wrong unit",
        None,
        ["--config", '{"target_modules": ["query"], "layer_schedule": {"0": [1]}}', "--steps", "3"],
        r"plan: error: --config: schedule_unit is 'epoch'",
    ),
    (
        "invalid target regex",
        {"target_modules": ".*(query", "layer_schedule": {"0": [1]}},
        [],
        r"not a valid regular expression",
    ),
]


@pytest.mark.parametrize("fields,extra,message", [c[1:] for c in PLAN_ERRORS], ids=[c[0] for c in PLAN_ERRORS])
def test_plan_error_table(tmp_path, capsys, config_folders, fields, extra, message):
    # fields None: the case passes its own --config (inline JSON)
    fields = None if fields is None else dict({"target_modules": ["query"]}, **fields)
    config = [] if fields is None else ["--config", write_json(tmp_path / "c.json", fields)]
    model = [] if "--model" in extra else ["--model", config_folders["bert6"]]
    code, _, err = run_cli(capsys, "plan", *(model + config + extra))
    assert code == 1
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_plan_on_an_encoder_decoder_config_json(tmp_path, capsys, config_folders):
    schedule = {"type": "sampled", "k": 1, "layers": ["encoder.-1", "decoder.0"], "always": ["decoder.-1"]}
    config = write_json(tmp_path / "t5.json", {"target_modules": ["q", "v"], "layer_schedule": schedule})
    code, out, _ = run_cli(capsys, "plan", "--model", config_folders["t5"], "--config", config, "--epochs", 4, "--json")
    assert code == 0
    plan = json.loads(out)
    assert [s["name"] for s in plan["stacks"]] == ["encoder", "decoder"]
    assert plan["preallocated_layers"] == ["encoder.2", "decoder.0", "decoder.1"]
    assert all(len(active) == 2 and "decoder.1" in active for active in plan["timeline"])


def _inspect(capsys, folder):
    code = cli.main(["inspect", str(folder), "--json"])
    return code, json.loads(capsys.readouterr().out)


def _train_and_save(folder, schedule, t, steps=2, num_layers=4, **config):
    """A few real optimizer steps at schedule time ``t`` on a tiny BERT, then save_pretrained."""
    config = ScheduledLoraConfig(
        r=2, target_modules=["query", "value"], layer_schedule=schedule, task_type="SEQ_CLS", init_seed=0, **config
    )
    model = get_peft_model(tiny_models.bert(num_layers=num_layers), config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if t is not None:
        model.activate_layers(t)
        inputs = tiny_models.example_inputs("bert")
        for _ in range(steps):
            model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(str(folder))
    return model


def test_inspect_reports_trained_adapters_from_the_weights(tmp_path, capsys):
    # 4 layers, gradual up to the top 3: adapters on 1-3; at epoch 2 layers 2-3 train, 1 has not joined yet.
    model = _train_and_save(tmp_path / "adapter", GRADUAL, t=2)
    code, text, err = run_cli(capsys, "inspect", tmp_path / "adapter")
    assert code == 0, err
    table = text.split("ever active\n")[1].split("\n\n")[0]
    rows = {line.split()[0]: line.split()[3:] for line in table.splitlines()}
    assert rows == {"1": ["untrained", "no"], "2": ["trained", "yes"], "3": ["trained", "yes"]}
    assert "exportable        yes: export_lora(model, out_dir) writes 4 module(s) of layer(s) 2-3" in text
    code, report = _inspect(capsys, tmp_path / "adapter")
    assert code == 0
    assert report["peft_type"] == "SCHEDULED_LORA"
    assert report["schedule"]["kind"] == "gradual"
    assert report["schedule"]["layer_schedule"] == GRADUAL
    assert report["preallocated_layers"] == model.preallocated_layers == [1, 2, 3]
    assert report["trained_layers"] == report["ever_active_layers"] == model.ever_active_layers == [2, 3]
    sizes = {layer: sum(p.numel() for p in ps) for layer, ps in model.base_model.layer_parameters().items()}
    assert report["lora_params_total"] == sum(sizes.values())
    assert report["trained_lora_params"] == sizes[2] + sizes[3]
    assert report["exportable"] is True and report["notes"] == []


def test_inspect_an_adapter_that_never_trained_is_not_exportable(tmp_path, capsys):
    _train_and_save(tmp_path, {0: [3], 5: [1]}, t=None)
    code, report = _inspect(capsys, tmp_path)
    assert code == 0
    assert report["preallocated_layers"] == [1, 3]
    assert report["trained_layers"] == [] and report["ever_active_layers"] == []
    assert report["exportable"] is False and "no layer has been active" in report["export"]


def test_inspect_a_callable_schedule_and_multi_stack_ids(tmp_path, capsys):
    with pytest.warns(UserWarning, match="not serialized"):
        _train_and_save(tmp_path / "callable", _top_two, t=0)
    code, report = _inspect(capsys, tmp_path / "callable")
    assert report["schedule"]["kind"] == "callable"
    assert "not saved" in report["schedule"]["description"]
    assert report["trained_layers"] == [2, 3]
    config = ScheduledLoraConfig(target_modules=["q", "v"], layer_schedule={0: ["decoder.-1"]}, init_seed=0)
    t5 = get_peft_model(tiny_models.t5(), config)
    t5.activate_layers(0)
    t5.save_pretrained(str(tmp_path / "t5"))
    code, report = _inspect(capsys, tmp_path / "t5")
    assert [layer["id"] for layer in report["layers"]] == ["decoder.1"] == report["ever_active_layers"]


def _top_two(t):
    return [-2, -1]


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """An adapter folder as save_pretrained writes it (one trained layer); copy it before changing it."""
    folder = tmp_path_factory.mktemp("saved") / "adapter"
    _train_and_save(folder, {0: [3]}, t=0, steps=1)
    return folder


def _weights_as(folder, name):
    """Keep ``folder``'s saved LoRA weights in ``name`` only (adapter_model.safetensors or .bin), converted
    if the installed PEFT wrote the other one; the path of that file."""
    from safetensors.torch import load_file, save_file

    written = [f for f in ("adapter_model.safetensors", "adapter_model.bin") if os.path.isfile(str(folder / f))]
    assert len(written) == 1, os.listdir(str(folder))
    if written[0] != name:
        source = str(folder / written[0])
        state = load_file(source) if source.endswith(".safetensors") else torch.load(source, map_location="cpu")
        if name.endswith(".safetensors"):
            save_file(state, str(folder / name))
        else:
            torch.save(state, str(folder / name))
        os.remove(source)
    return str(folder / name)


# (case id, weights file, how many of its bytes are kept): a copy or download cut short.
CORRUPT_WEIGHTS = [
    ("safetensors cut in half", "adapter_model.safetensors", lambda size: size // 2),
    ("safetensors cut to 10 bytes", "adapter_model.safetensors", lambda size: 10),
    ("bin cut in half", "adapter_model.bin", lambda size: size // 2),
    ("bin cut to 10 bytes", "adapter_model.bin", lambda size: 10),
]


@pytest.mark.parametrize("name,kept", [c[1:] for c in CORRUPT_WEIGHTS], ids=[c[0] for c in CORRUPT_WEIGHTS])
def test_inspect_truncated_weights_is_an_error_naming_the_file(tmp_path, capsys, saved_adapter, name, kept):
    folder = tmp_path / "adapter"
    shutil.copytree(str(saved_adapter), str(folder))
    path = _weights_as(folder, name)
    code, _, err = run_cli(capsys, "inspect", folder)
    assert code == 0, err  # the whole file reads
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: kept(len(data))])
    code, out, err = run_cli(capsys, "inspect", folder)
    assert code == 1 and out == ""
    assert err.startswith(f"peft-layersched inspect: error: {path}: cannot be read"), err
    assert "truncated" in err and "save_pretrained" in err
    assert "Traceback" not in err


def test_help_version_and_subcommand_registry(capsys):
    assert cli.main([]) == 0
    help_text = capsys.readouterr().out
    assert "plan" in help_text and "inspect" in help_text
    assert ("demo" in help_text) == (importlib.util.find_spec("peft_layersched.cli.demo") is not None)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert "peft-layersched" in capsys.readouterr().out

    def add(parser):
        parser.add_argument("--times", type=int, default=1)

    cli.register_subcommand("echo-test", add, lambda args: args.times + 1, help="test only")
    try:
        assert cli.main(["echo-test", "--times", "2"]) == 3
    finally:
        cli.program._SUBCOMMANDS[:] = [entry for entry in cli.program._SUBCOMMANDS if entry[0] != "echo-test"]



# --config takes the dict inline, as its help and docs/cli.md say (the demo's --schedule takes JSON the same way).
_SCHEDULES = st.one_of(
    st.dictionaries(st.integers(0, 9).map(str), st.lists(st.integers(-6, 5), min_size=1, max_size=3, unique=True),
                    min_size=1, max_size=3).filter(lambda d: "0" in d),
    st.builds(lambda every, limit: {"type": "gradual", "every": every, "limit": limit},
              st.integers(1, 3), st.integers(1, 6)),
    st.builds(lambda block, every: {"type": "cyclic", "block": block, "every": every},
              st.integers(1, 3), st.integers(1, 3)),
)
_FIELDS = st.fixed_dictionaries(
    {"target_modules": st.lists(st.sampled_from(["query", "key", "value", "dense"]), min_size=1, max_size=4,
                                unique=True),
     "layer_schedule": _SCHEDULES},
    optional={"r": st.integers(1, 16), "lora_alpha": st.integers(1, 32), "task_type": st.just("SEQ_CLS")},
)
# How a person might type the object: on one line or several, with or without spaces, padded.
_LAYOUTS = st.tuples(st.sampled_from([None, 0, 2]), st.sampled_from([(", ", ": "), (",", ":")]),
                     st.sampled_from(["", " ", "\n  "]))


def _plan_json(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(argv)
    return code, out.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=_FIELDS, layout=_LAYOUTS)
def test_plan_config_inline_json_is_the_same_as_the_file(config_folders, tmp_path_factory, fields, layout):
    indent, separators, pad = layout
    inline = pad + json.dumps(fields, indent=indent, separators=separators) + pad
    folder = tmp_path_factory.mktemp("inline")
    model = ["plan", "--model", config_folders["bert6"], "--json", "--config"]
    file_code, from_file = _plan_json(model + [write_json(folder / "c.json", fields)])
    inline_code, from_inline = _plan_json(model + [inline])
    assert inline_code == file_code
    if file_code == 0:  # (a schedule this 6-layer model refuses is refused the same way either way)
        assert json.loads(from_inline) == json.loads(from_file)


def test_plan_model_type_and_inline_config_as_docs_cli_shows(capsys):
    # No folder and no hub: `--model bert` is transformers' default BERT config (BERT-base, 12 layers).
    schedule = ('{"target_modules": ["query", "value"], "task_type": "SEQ_CLS", '
                '"layer_schedule": {"0": [11], "3": [1, 11]}}')
    code, out, err = run_cli(capsys, "plan", "--model", "bert", "--config", schedule, "--epochs", 5)
    assert code == 0, err
    assert "BertForSequenceClassification from bert (built on meta: no weights)" in out
    assert "bert.encoder.layer: 12 layers (ids 0..11)" in out
    phases = [line.split() for line in out.split("phases:")[1].splitlines() if line.strip()]
    assert phases[1:] == [["0-2", "11", "24,576"], ["3-4", "1,", "11", "49,152"]]


@pytest.mark.slow  # a process of its own
def test_plan_model_hub_id_from_the_local_cache(tmp_path, config_folders):
    # A Hub id whose config.json is in the local Hugging Face cache: read offline, as `plan` promises.  The
    # installed entry point in a process of its own (the cache location is read at import).
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    shutil.copy(os.path.join(config_folders["bert6"], "config.json"), str(repo / "snapshots" / revision))
    hub = str(tmp_path / "hub")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=hub,
               HUGGINGFACE_HUB_CACHE=hub, TRANSFORMERS_CACHE=hub)
    schedule = '{"target_modules": ["query"], "layer_schedule": {"0": [5]}}'
    result = subprocess.run(
        console_script() + ["plan", "--model", "someone/tiny-bert", "--config", schedule, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, cwd=str(tmp_path), env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model"]["class"] == "BertForSequenceClassification"
    assert plan["stacks"] == [{"name": "bert.encoder.layer", "path": "bert.encoder.layer", "length": 6}]
