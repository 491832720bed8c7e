"""The model card that ``save_pretrained`` leaves next to a scheduled adapter tells whoever finds the folder how
to load it: ``import peft_layersched`` first (without it PEFT fails with ``KeyError: 'SCHEDULED_LORA'``).

The card's own snippet runs in a fresh process, as someone who was handed the folder would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model

from peft_layersched import LayerScheduler, ScheduledLoraConfig

from helpers import tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

# A process that has never imported peft_layersched: the tiny BERT from a config (the same seed, the same
# weights as the one trained here), then the card's code with ``base_model`` bound to it.
LOADER = """
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import tiny_models
torch.manual_seed(0)
base_model = tiny_models.bert(num_layers=4)
assert "peft_layersched" not in sys.modules
exec(compile(open({code!r}).read(), "model card", "exec"))
config = model.peft_config["default"]
print("LOADED", type(config).__name__, config.layer_schedule, config.ever_active_layers)
"""


def _train_and_save(folder):
    torch.manual_seed(0)
    config = ScheduledLoraConfig(r=2, target_modules=["query", "value"], layer_schedule={0: [3], 1: [2, 3]},
                                 task_type="SEQ_CLS", init_seed=0)
    model = get_peft_model(tiny_models.bert(num_layers=4), config)
    optimizer = torch.optim.SGD(LayerScheduler.param_groups(model), lr=0.1)
    sched = LayerScheduler(model, optimizer)
    inputs = tiny_models.example_inputs("bert")
    for _ in range(2):
        model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sched.epoch_end()
    model.save_pretrained(str(folder))


def _run(code_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    script = LOADER.format(tests=HERE, code=str(code_file))
    return subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.mark.slow  # a process of its own
def test_the_model_card_says_to_import_the_package_and_its_snippet_loads_the_adapter(tmp_path):
    _train_and_save(tmp_path / "adapter")
    card_file = tmp_path / "adapter" / "README.md"
    if not card_file.exists():
        pytest.skip("this PEFT release writes no model card")
    card = card_file.read_text(encoding="utf-8")
    assert "import peft_layersched" in card and "KeyError: 'SCHEDULED_LORA'" in card
    # Saving again (a later checkpoint into the same folder) keeps one note.
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 1 and card.count("## Loading this adapter") == 1
    code = snippets[0]
    assert "import peft_layersched" in code and '"adapter"' in code

    as_written = tmp_path / "as_written.py"
    as_written.write_text(code)
    result = _run(as_written, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the tuner and its schedule came back: after two epochs layers 2 and 3 had trained
    assert "LOADED ScheduledLoraConfig {0: [3], 1: [2, 3]} [2, 3]" in result.stdout, result.stdout

    # Without the import line the same load fails, naming the type PEFT does not know: why the card says it.
    without = tmp_path / "without_import.py"
    without.write_text("\n".join(line for line in code.splitlines() if line.strip() != "import peft_layersched"
                                 and not line.startswith("import peft_layersched ")))
    result = _run(without, tmp_path)
    assert result.returncode != 0 and "SCHEDULED_LORA" in result.stderr, result.stdout + result.stderr[-3000:]


def test_a_second_save_into_the_same_folder_keeps_one_note(tmp_path):
    _train_and_save(tmp_path / "adapter")
    _train_and_save(tmp_path / "adapter")
    card_file = tmp_path / "adapter" / "README.md"
    if not card_file.exists():
        pytest.skip("this PEFT release writes no model card")
    assert card_file.read_text(encoding="utf-8").count("## Loading this adapter") == 1
