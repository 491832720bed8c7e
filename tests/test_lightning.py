"""LayerScheduleFinetuning: real Lightning fits on CPU (one process, a resume from a checkpoint, 2 DDP ranks).

Skipped where lightning is not installed (the tox env ``lightning`` has it), except the check of the
message a missing lightning gives.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys

import pytest
import torch

from peft_layersched import LayerScheduler

from helpers.launch import two_ranks


@pytest.fixture()
def lt():
    """helpers.lightning_training, with lightning imported (the test skips without it)."""
    pytest.importorskip("lightning.pytorch")
    from helpers import lightning_training

    return lightning_training


def finetuning(**options):
    from peft_layersched.lightning import LayerScheduleFinetuning

    return LayerScheduleFinetuning(**options)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def scheduled_time(step, unit, steps_per_epoch):
    """The schedule time at which optimizer step ``step`` (1-based) trains."""
    return step - 1 if unit == "step" else (step - 1) // steps_per_epoch


# ------------------------------------------------------------------------------- one process

FIT_CASES = [
    # (id, layer_schedule, unit, Trainer options, LayerScheduleFinetuning options, optimizer steps per epoch)
    # ToyClassification(16) in batches of 4: 4 batches per epoch
    ("step", {0: [3], 3: [1]}, "step", {"max_steps": 6}, {}, 4),
    ("step-accumulate-2", {0: [3], 3: [1]}, "step", {"max_steps": 6, "accumulate_grad_batches": 2}, {}, 2),
    ("step-warmup-drop", {0: [3], 3: [1, 3], 5: [2]}, "step", {"max_steps": 7},
     {"new_layer_warmup_steps": 2, "new_layer_lr_scale": 0.5, "frozen_optimizer_state": "drop"}, 4),
    ("epoch", {0: [3], 2: [1]}, "epoch", {"max_epochs": 3}, {}, 4),
]


@pytest.mark.parametrize("schedule,unit,options,callback_options,per_epoch", [c[1:] for c in FIT_CASES],
                         ids=[c[0] for c in FIT_CASES])
def test_fit_trains_exactly_the_scheduled_layers_and_logs_them(
    lt, tmp_path, schedule, unit, options, callback_options, per_epoch
):
    model = lt.scheduled_bert(schedule, unit)
    plan = model.base_model.scheduled_adapter()
    recorder, logger = lt.Recorder(), lt.MemoryLogger()
    run = lt.trainer(tmp_path, [finetuning(**callback_options), recorder], logger=logger, **options)
    run.fit(lt.ScheduledModule(model), lt.loader())

    steps = recorder.steps
    assert [s["step"] for s in steps] == list(range(run.global_step + 1))
    logged = [metrics for _, metrics in logger.rows if "layer_schedule/active_layers" in metrics]
    assert len(logged) == run.global_step
    for step in range(1, len(steps)):
        active = plan.schedule.active_at(scheduled_time(step, unit, per_epoch))
        before, after = steps[step - 1]["hashes"], steps[step]["hashes"]
        for layer in plan.preallocated_layers:
            # a frozen (or not yet active) layer is bitwise still; an active one moved
            assert (before[str(layer)] != after[str(layer)]) == (layer in active), (step, layer, active)
            assert logged[step - 1][f"layer_schedule/active/{layer}"] == float(layer in active)
            assert (logged[step - 1][f"layer_schedule/lr/{layer}"] > 0) == (layer in active)
        assert logged[step - 1]["layer_schedule/active_layers"] == float(len(active))
    # the schedule really switched, and the adapter records how far it ran
    assert steps[0]["active"] != steps[-1]["active"]
    last = run.global_step if unit == "step" else run.current_epoch - 1
    assert model.peft_config["default"].schedule_position == last


def test_joining_layer_lr_is_scaled_and_warmed_up(lt, tmp_path):
    model = lt.scheduled_bert({0: [3], 2: [1, 3]}, "step")
    logger = lt.MemoryLogger()
    run = lt.trainer(tmp_path, [finetuning(new_layer_lr_scale=0.5, new_layer_warmup_steps=2)], logger=logger,
                     max_steps=5)
    run.fit(lt.ScheduledModule(model, lr=1e-2), lt.loader())
    rows = [metrics for _, metrics in logger.rows if "layer_schedule/lr/1" in metrics]
    ratio = [row["layer_schedule/lr/1"] / row["layer_schedule/lr/3"] for row in rows]
    # layer 1 joins after step 2: half the LR, reached over 2 steps (0.25, 0.5); layer 3 at the full LR
    assert ratio == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.5])


def test_a_plateau_lr_scheduler_reduces_frozen_layers_too(lt, tmp_path):
    class Plateau(lt.ScheduledModule):
        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            optimizer = torch.optim.AdamW(LayerScheduler.param_groups(self.model), lr=1e-2)
            # no step counts as an improvement: the LR halves after every step from the 2nd on
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=0.5, patience=0, threshold=1e9, threshold_mode="abs")
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": plateau, "interval": "step", "monitor": "train_loss"}}

    model = lt.scheduled_bert({0: [3], 2: [1], 4: [1, 3]}, "step")
    logger = lt.MemoryLogger()
    lt.trainer(tmp_path, [finetuning()], logger=logger, max_steps=6).fit(Plateau(model), lt.loader())
    rows = [metrics for _, metrics in logger.rows if "layer_schedule/lr/1" in metrics]
    lrs = [max(row["layer_schedule/lr/1"], row["layer_schedule/lr/3"]) for row in rows]
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 2.5e-3, 1.25e-3, 6.25e-4])
    # layer 3, frozen while the LR was reduced, rejoins at the reduced LR (not at the one it froze with)
    assert rows[4]["layer_schedule/lr/3"] == rows[4]["layer_schedule/lr/1"]


def test_log_metrics_false_logs_nothing_of_the_schedule(lt, tmp_path):
    model = lt.scheduled_bert({0: [3], 2: [1]}, "step")
    logger = lt.MemoryLogger()
    lt.trainer(tmp_path, [finetuning(log_metrics=False)], logger=logger, max_steps=3).fit(
        lt.ScheduledModule(model), lt.loader())
    assert not [key for _, metrics in logger.rows for key in metrics if key.startswith("layer_schedule/")]
    assert model.active_layers == [1]


# ----------------------------------------------------------------------------------- resume

RESUME_CASES = [
    # (id, layer_schedule, unit, Trainer options, callback options, ModelCheckpoint options, the step of the
    # checkpoint resumed from).  ToyClassification(8) in batches of 4: 2 steps per epoch; checkpoints at
    # epoch ends (Lightning restarts a plain DataLoader's epoch from its first batch).
    ("step-warmup-drop", {0: [3], 3: [1, 3], 5: [2]}, "step", {"max_steps": 8},
     {"new_layer_warmup_steps": 3, "frozen_optimizer_state": "drop"}, {"every_n_train_steps": 4}, 4),
    ("epoch-scale-reset", {0: [3], 2: [1], 3: [2, 3]}, "epoch", {"max_epochs": 5},
     {"new_layer_lr_scale": 0.5, "reactivated_state": "reset"}, {"every_n_epochs": 1}, 6),
    # an adaptive schedule: calibrated on the training data, decisions replayed from the checkpoint's state
    ("adaptive-outlier", {"type": "adaptive", "k": 1, "every": 2, "signal": "outlier", "calibration_batches": 2},
     "step", {"max_steps": 8}, {}, {"every_n_train_steps": 4}, 4),
    ("autofreeze", {"type": "autofreeze", "every": 2, "percentile": 90}, "step", {"max_steps": 8}, {},
     {"every_n_train_steps": 4}, 4),
]


@pytest.mark.parametrize("schedule,unit,options,callback_options,checkpoint,resume_step",
                         [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_fit_from_ckpt_path_ends_bitwise_as_the_uninterrupted_run(
    lt, tmp_path, schedule, unit, options, callback_options, checkpoint, resume_step
):
    import lightning.pytorch as pl

    whole = lt.scheduled_bert(schedule, unit)
    saver = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, **checkpoint)
    lt.trainer(tmp_path / "whole", [finetuning(**callback_options), saver], **options).fit(
        lt.ScheduledModule(whole), lt.loader(n=8))

    (path,) = glob.glob(str(tmp_path / "ckpt" / f"*step={resume_step}.ckpt"))
    saved = torch.load(path, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("LayerScheduleFinetuning")]
    assert state["steps"] == resume_step
    json.dumps(state)  # a plain-data entry

    resumed = lt.scheduled_bert(schedule, unit)
    recorder = lt.Recorder()
    run = lt.trainer(tmp_path / "resumed", [finetuning(**callback_options), recorder], **options)
    with _no_load_warning():
        run.fit(lt.ScheduledModule(resumed), lt.loader(n=8), ckpt_path=path)

    assert recorder.steps[0]["step"] == resume_step and run.global_step > resume_step
    final, expected = weights(resumed), weights(whole)
    assert set(final) == set(expected)
    differ = [name for name in expected if not torch.equal(final[name], expected[name])]
    assert not differ, differ
    assert resumed.active_layers == whole.active_layers
    assert resumed.peft_config["default"].schedule_position == whole.peft_config["default"].schedule_position


class _no_load_warning(object):
    """No "carry trained LoRA weights" warning while a checkpoint's weights load before the schedule moved."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        messages = [str(w.message) for w in self.caught if "carry trained LoRA weights" in str(w.message)]
        assert not messages, messages
        return False


# ---------------------------------------------------------------------------------- refusals

def test_refuses_an_optimizer_without_layer_groups_when_lr_factors_are_set(lt, tmp_path):
    class PlainOptimizer(lt.ScheduledModule):
        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    model = lt.scheduled_bert({0: [3], 2: [1]}, "step")
    run = lt.trainer(tmp_path, [finetuning(new_layer_warmup_steps=2)], max_steps=3)
    with pytest.raises(ValueError, match=r"LayerScheduler\.param_groups"):
        run.fit(PlainOptimizer(model), lt.loader())


def test_options_are_checked_when_created(lt):
    with pytest.raises(ValueError, match="frozen_optimizer_state='offload'"):
        finetuning(frozen_optimizer_state="drop", reactivated_state="keep")
    with pytest.raises(TypeError, match="log_metrics"):
        finetuning(log_metrics="yes")


def test_the_standalone_pytorch_lightning_package_serves_where_lightning_is_missing(monkeypatch):
    pytest.importorskip("pytorch_lightning")
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "peft_layersched.lightning", raising=False)
    monkeypatch.delitem(sys.modules, "peft_layersched.integrations.lightning", raising=False)
    module = importlib.import_module("peft_layersched.lightning")
    import pytorch_lightning

    assert issubclass(module.LayerScheduleFinetuning, pytorch_lightning.Callback)


def test_without_lightning_the_import_says_how_to_install_it(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails as if it were not installed
    monkeypatch.delitem(sys.modules, "peft_layersched.lightning", raising=False)
    monkeypatch.delitem(sys.modules, "peft_layersched.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("peft_layersched.lightning")


def test_the_top_level_name_imports_lightning_only_when_asked_for(monkeypatch):
    import subprocess

    code = ("import sys, peft_layersched; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    import peft_layersched

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "peft_layersched.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match="pip install lightning"):
        getattr(peft_layersched, "LayerScheduleFinetuning")  # noqa: B009
    with pytest.raises(AttributeError, match="no attribute 'LayerScheduleFinetunning'"):
        getattr(peft_layersched, "LayerScheduleFinetunning")  # noqa: B009


def test_the_top_level_name_is_the_lightning_callback(lt):
    from peft_layersched import LayerScheduleFinetuning
    from peft_layersched.lightning import LayerScheduleFinetuning as public

    assert LayerScheduleFinetuning is public


# ------------------------------------------------------------------------------- 2 DDP ranks

@pytest.mark.slow  # 2 processes
def test_two_ddp_ranks_train_identically_and_switch(lt, tmp_path):
    two_ranks("lightning_worker", tmp_path, ["step", "refuse"], timeout=240)
    ranks = []
    for rank in (0, 1):
        with open(os.path.join(str(tmp_path), "step{}.json".format(rank))) as handle:
            ranks.append(json.load(handle))
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["steps"] == ranks[1]["steps"]  # same active sets and bitwise the same LoRA weights
    steps = ranks[0]["steps"]
    assert [s["active"] for s in steps] == [[3]] * 3 + [[1]] * 4
    # layer 3 is still from its freeze on; layer 1 moves from its join on
    assert len({s["hashes"]["3"] for s in steps[3:]}) == 1
    assert len({s["hashes"]["1"] for s in steps[3:]}) == len(steps) - 3
    for rank in (0, 1):
        with open(os.path.join(str(tmp_path), "refuse{}.json".format(rank))) as handle:
            assert "ddp_find_unused_parameters_true" in json.load(handle)["message"]
