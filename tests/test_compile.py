"""``torch.compile`` with a schedule: no graph break from the package, one recompile per switch at most,
and the weights eager training gives.

The backend is ``aot_eager`` (dynamo's graph capture and AOTAutograd's joint graph, run by eager kernels),
which checks exactly what the package can break: tracing through its hooks and its per-layer state, and
the guards a switch invalidates.  Inductor's code generation is the same for our graphs and vanilla
PEFT's, and costs minutes on CPU; ``benchmarks/compile_bench.py`` times it.
Tolerance: compiled and eager weights are compared with ``torch.allclose(rtol=1e-5, atol=1e-6)`` after
every phase (AOTAutograd may reorder float additions in backward).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import get_peft_model

from peft_layersched import LayerScheduleCallback, ScheduledLoraConfig

from helpers import tiny_models
from helpers.snapshots import lora
from helpers.toy_training import training_args

if os.environ.get("TOX_ENV_NAME") and os.environ.get("PEFT_LAYERSCHED_COMPILE_TESTS") != "1":
    # ~30 s of dynamo tracing: tox.ini runs it in the oldest transformers and the newest torch envs only
    pytest.skip("compile tests run in the tox envs that set PEFT_LAYERSCHED_COMPILE_TESTS=1", allow_module_level=True)
if not hasattr(torch, "compile"):
    pytest.skip("torch.compile needs torch >= 2.0 (this is {})".format(torch.__version__), allow_module_level=True)

from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.slow  # torch.compile's tracing

SCHEDULE = {0: [2], 2: [1, 2], 4: [0]}  # top, then the two top layers, then the bottom one (the stop moves)
LAYERS = 3
PHASES = 3
BACKEND = "aot_eager"


def _close(a, b):
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a) and set(a) == set(b)


def _fresh_counters():
    torch._dynamo.reset()
    counters.clear()


def _breaks():
    return sum(sum(v.values()) for v in counters["graph_break"].values())


def _graphs():
    return counters["stats"]["unique_graphs"]


def _step(model, optimizer, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_compiled_plain_loop_follows_eager_phase_by_phase_without_graph_breaks():
    ids = tiny_models.example_inputs("llama")["input_ids"]

    config = ScheduledLoraConfig(r=4, target_modules=["q_proj", "v_proj"], layer_schedule=SCHEDULE, init_seed=0)
    eager = get_peft_model(tiny_models.llama(LAYERS), config)
    twin = copy.deepcopy(eager)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, twin)]
    _fresh_counters()
    compiled = torch.compile(twin, backend=BACKEND)
    graphs_per_phase = []
    for t in range(2 * PHASES):
        for model in (eager, twin):
            model.base_model.activate_layers(t)
        _step(eager, optimizers[0], ids)
        _step(compiled, optimizers[1], ids)
        if t % 2:
            assert _close(lora(eager), lora(twin)), "phase ending at t={}".format(t)
            graphs_per_phase.append(_graphs())
    assert _breaks() == 0  # (vanilla PEFT LoRA on these models compiles to one graph, no break, too)
    # one graph per phase: a switch recompiles once (requires_grad guards), and never inside a phase
    assert graphs_per_phase == [1, 2, 3]
    assert lora(eager) != {} and not _close(lora(eager), lora(get_peft_model(tiny_models.llama(LAYERS), config)))


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        self.ids = torch.randint(1, 99, (16, 7), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_run(out, compile_it):
    from transformers import Trainer

    config = ScheduledLoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], layer_schedule=SCHEDULE, schedule_unit="step", init_seed=0
    )
    model = get_peft_model(tiny_models.llama(LAYERS), config)
    extra = dict(torch_compile=True, torch_compile_backend=BACKEND) if compile_it else {}
    # remove_unused_columns=False: transformers < 4.35 read the compiled wrapper's (*args, **kwargs) signature
    # and drop every column (vanilla PEFT too)
    args = training_args(out, max_steps=6, weight_decay=0.0, remove_unused_columns=False, **extra)
    Trainer(model=model, args=args, train_dataset=_Data(), callbacks=[LayerScheduleCallback()]).train()
    return model


def test_trainer_torch_compile_trains_like_eager(tmp_path):
    eager = _trainer_run(tmp_path / "eager", False)
    _fresh_counters()
    compiled = _trainer_run(tmp_path / "compiled", True)
    assert _graphs() >= 1, "the Trainer did not compile the model"
    assert _breaks() == 0
    assert _graphs() == PHASES  # one graph per phase: a recompile at each switch, none inside a phase
    assert compiled.base_model.active_layers == [0]
    assert _close(lora(eager), lora(compiled))
