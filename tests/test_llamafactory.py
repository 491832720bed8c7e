"""LLaMA-Factory as a client: ``run_exp(args, callbacks=[LayerScheduleCallback(layer_schedule=...)])`` on its own
LoRA (``examples/llamafactory_layer_schedule.py``), where LLaMA-Factory imports; no tox env installs it (it
pins its own torch/peft/transformers/trl stack)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _llamafactory_imports():
    try:
        import llamafactory.train.tuner  # noqa: F401
    except Exception as exc:  # a broken install fails with OSError too (a torchaudio built for another torch)
        return "LLaMA-Factory does not import here: {}: {}".format(type(exc).__name__, exc)
    return None


WHY_NOT = _llamafactory_imports()

pytestmark = pytest.mark.slow  # the example in a process of its own


@pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
def test_run_exp_with_the_callback_schedules_llamafactorys_lora(tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "llamafactory_layer_schedule.py"), "--output-dir",
         str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "peft_type: SCHEDULED_LORA | ever_active_layers: [2, 3] | layers whose lora_B moved: [2, 3]" in done.stdout

    import peft_layersched  # noqa: F401  (registers SCHEDULED_LORA)

    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "model"))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run"), is_trainable=True)
    assert type(loaded.base_model).__name__ == "ScheduledLoraModel"
    assert loaded.preallocated_layers == [0, 1, 2, 3] and loaded.ever_active_layers == [2, 3]
    assert loaded.activate_layers(2) == [2, 3]
    lora_b = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in lora_b.items() if ".layers.0." in n or ".layers.1." in n)
