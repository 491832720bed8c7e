"""Pictures (matplotlib, an optional extra): ``plan --plot``'s timeline and the demo's accuracy against time."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from peft_layersched import cli
from peft_layersched.cli.plot import (
    ACTIVE,
    FROZEN,
    NO_ADAPTER,
    WAITING,
    MatplotlibMissing,
    accuracy_over_time,
    plot_accuracy,
    timeline_states,
)

pytestmark = pytest.mark.usefixtures("transformers_logging_restored")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# 12 layers; adapters on 9-11; 11 trains at epochs 0-1, 9 at 2-3, nothing from 4 on; 10 never.
FIELDS = {"target_modules": ["query", "value"], "layer_schedule": {"0": [11], "2": [9], "4": []},
          "preallocate_layers": [9, 10, 11]}


def test_timeline_states_tell_training_frozen_waiting_and_no_adapter():
    timeline = [[11], [11], [9], [9], [], []]
    rows = [11, 10, 9, 8]
    assert timeline_states(rows, timeline, [9, 10, 11]) == [
        [ACTIVE, ACTIVE, FROZEN, FROZEN, FROZEN, FROZEN],
        [WAITING] * 6,
        [WAITING, WAITING, ACTIVE, ACTIVE, FROZEN, FROZEN],
        [NO_ADAPTER] * 6,
    ]


@pytest.fixture()
def plan_args(tmp_path, config_folders):
    with open(str(tmp_path / "cfg.json"), "w") as handle:
        json.dump(FIELDS, handle)
    return ["plan", "--model", config_folders["bert12"], "--config", str(tmp_path / "cfg.json"), "--epochs", "6"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed in this env (peft0212-tf5 has it)")
def test_plan_plot_draws_every_state(tmp_path, plan_args, capsys):
    import matplotlib.image

    from peft_layersched.cli.plot import _COLOURS

    out = str(tmp_path / "timeline.png")
    assert cli.main(plan_args + ["--plot", out]) == 0
    assert f"timeline drawn to {out}" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 200 and image.shape[1] > 300
    pixels = {tuple(int(round(255 * c)) for c in px[:3]) for px in image.reshape(-1, image.shape[-1])}
    for colour in _COLOURS:  # each of the four states appears in the grid
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert rgb in pixels, colour


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed in this env (peft0212-tf5 has it)")
def test_plan_plot_to_a_name_without_a_suffix_reports_the_png_it_wrote(tmp_path, plan_args, capsys):
    assert cli.main(plan_args + ["--plot", str(tmp_path / "timeline")]) == 0
    written = str(tmp_path / "timeline.png")
    assert f"timeline drawn to {written}\n" in capsys.readouterr().out
    assert sorted(os.listdir(str(tmp_path))) == ["cfg.json", "timeline.png"]
    assert cli.main(plan_args + ["--plot", str(tmp_path / "timeline"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == written


def test_plan_plot_without_matplotlib_says_how_to_install_it(tmp_path, plan_args, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, installed or not
    assert cli.main(plan_args + ["--plot", str(tmp_path / "t.png")]) == 1
    assert "pip install 'peft-layersched[plot]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the demo's accuracy plot

SCHEDULED = [{"seconds": 1.5, "accuracy": 0.6}, {"seconds": 2.0, "accuracy": 0.75}, {"seconds": 2.5, "accuracy": 0.9}]
PLAIN = [{"seconds": 4.0, "accuracy": 0.8}, {"seconds": 4.0, "accuracy": 1.0}, {"seconds": 4.5, "accuracy": 1.0}]
RUNS = [
    {"label": "scheduled LoRA", "epochs": SCHEDULED, "notes": ["layer 5", "", "layers 3-5"]},
    {"label": "plain LoRA", "epochs": PLAIN, "notes": None},
]


def test_accuracy_over_time_starts_at_zero_and_adds_up_the_epochs():
    assert accuracy_over_time(SCHEDULED, 0.5) == ([0.0, 1.5, 3.5, 6.0], [0.5, 0.6, 0.75, 0.9])
    assert accuracy_over_time([], 0.5) == ([0.0], [0.5])


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed in this env (peft0212-tf5 has it)")
def test_accuracy_plot_draws_both_runs(tmp_path):
    import matplotlib.image

    from peft_layersched.cli.plot import _RUN_COLOURS

    out = str(tmp_path / "accuracy.png")
    assert plot_accuracy(out, RUNS, 0.5, "demo: test accuracy against training time") == out
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 600
    pixels = {tuple(int(round(255 * c)) for c in px[:3]) for px in image.reshape(-1, image.shape[-1])}
    for colour in _RUN_COLOURS[:2]:  # one line (and its epoch markers) per run
        assert tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) in pixels, colour


# (name given, file written): savefig picks the format by the suffix, and adds ".png" to a name without one.
PLOT_NAMES = [("accuracy", "accuracy.png"), ("accuracy.", "accuracy.png"), ("accuracy.svg", "accuracy.svg"),
              ("run.1.pdf", "run.1.pdf")]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed in this env (peft0212-tf5 has it)")
@pytest.mark.parametrize("name,written", PLOT_NAMES, ids=[c[0] for c in PLOT_NAMES])
def test_accuracy_plot_returns_the_file_it_wrote(tmp_path, name, written):
    assert plot_accuracy(str(tmp_path / name), RUNS, 0.5, "title") == str(tmp_path / written)
    assert os.listdir(str(tmp_path)) == [written]


def test_accuracy_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails, installed or not
    out = str(tmp_path / "accuracy.png")
    with pytest.raises(MatplotlibMissing, match=r"pip install 'peft-layersched\[plot\]'"):
        plot_accuracy(out, RUNS, 0.5, "title")
    assert not os.path.exists(out)
