"""Bring your own LoRA: ``schedule_lora`` on a PeftModel that another tool built from a plain ``LoraConfig``.

One row per model family (BERT-like encoder classifier, LLaMA-like causal LM); each generic test runs on
every row.  A LoRA that the tool put on every layer is adopted as it is (same weights, same output), and
from then on behaves bitwise like a model built from a ``ScheduledLoraConfig`` with the same weights.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import Trainer

from peft_layersched import LayerScheduleCallback, LayerScheduler, ScheduledLoraConfig, schedule_lora
from peft_layersched.training.engines import LAYER_KEY

from helpers import tiny_models
from helpers.snapshots import lora as lora_state
from helpers.snapshots import same
from helpers.toy_training import ToyClassification, training_args


class ToyLM(Dataset):
    """Causal-LM batches: the labels are the inputs (the model shifts them)."""

    def __init__(self, n=16, seq=8, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 99, (n, seq), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Row(object):
    """A tool's LoRA on one family: every layer of ``layers`` carries LoRA; the schedule uses ``top`` then
    ``low``; ``spare`` carries LoRA but is never scheduled."""

    def __init__(self, family, builder, targets, task_type, dataset, top, low, spare, prefix):
        self.family, self.builder, self.targets, self.task_type = family, builder, targets, task_type
        self.dataset = dataset
        self.top, self.low, self.spare, self.prefix = top, low, spare, prefix

    def __repr__(self):
        return self.family

    @property
    def schedule(self):
        return {0: [self.top], 2: [self.low, self.top]}

    def lora_config(self, **overrides):
        # lora_alpha / lora_dropout given: PEFT 0.3.0's LoraConfig defaults them to None (and crashes on them).
        kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(self.targets), task_type=self.task_type)
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    def tool_model(self, lora_seed=None, **overrides):
        """What LLaMA-Factory / axolotl / TRL hand over: ``get_peft_model`` with a plain ``LoraConfig`` (its LoRA
        initialised after ``torch.manual_seed(lora_seed)`` when given)."""
        base = self.builder()
        if lora_seed is not None:
            torch.manual_seed(lora_seed)
        return get_peft_model(base, self.lora_config(**overrides))

    def layer_of(self, name):
        head = name.split(self.prefix, 1)
        return int(head[1].split(".", 1)[0]) if len(head) == 2 else None

    def inputs(self):
        return {"input_ids": tiny_models.example_inputs(self.family)["input_ids"]}


ROWS = [
    Row("bert", lambda: tiny_models.bert(num_layers=4), ["query", "value"], "SEQ_CLS", ToyClassification,
        top=3, low=1, spare=2, prefix="encoder.layer."),
    Row("llama", tiny_models.llama, ["q_proj", "v_proj"], "CAUSAL_LM", ToyLM, top=3, low=1, spare=2,
        prefix="model.layers."),
]


def by_layer(row, state):
    grouped = {}
    for name, value in state.items():
        grouped.setdefault(row.layer_of(name), {})[name] = value
    return grouped


def eval_logits(model, row):
    model.eval()
    with torch.no_grad():
        return model(**row.inputs()).logits


def run_trainer(model, row, out, callbacks, resume=None, **args):
    trainer = Trainer(
        model=model,
        args=training_args(out, max_steps=4, num_train_epochs=1, **args),
        train_dataset=row.dataset(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("init", [True, False], ids=["zero-B init", "non-zero init"])
@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_adoption_keeps_the_tools_weights_output_and_config(row, init):
    model = row.tool_model(init_lora_weights=init)
    tools_config = model.peft_config["default"]
    tools_fields = dict(vars(tools_config)) if hasattr(tools_config, "__dict__") else None
    weights, out = lora_state(model), eval_logits(model, row)

    assert schedule_lora(model, layer_schedule=row.schedule, schedule_unit="step") is model

    assert type(model.base_model).__name__ == "ScheduledLoraModel"
    assert same(lora_state(model), weights)  # not re-initialised
    assert torch.equal(eval_logits(model, row), out)
    assert model.preallocated_layers == [0, 1, 2, 3]  # exactly where the tool put LoRA
    # Every preallocated adapter is registered for the optimizer, only the first phase's gets grads.
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n} == set(weights)
    # Non-zero-init adapters are in the forward already: they count as trained, so nothing changes.
    assert model.ever_active_layers == ([] if init else [0, 1, 2, 3])
    own = model.peft_config["default"]
    assert isinstance(own, ScheduledLoraConfig) and own is not tools_config
    assert type(tools_config) is LoraConfig
    if tools_fields is not None:
        assert dict(vars(tools_config)) == tools_fields
    assert own.r == tools_config.r and own.task_type == tools_config.task_type
    assert own.init_lora_weights == init
    assert model.activate_layers(0) == [row.top]
    assert {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n} == {
        n for n in weights if row.layer_of(n) == row.top
    }


@pytest.mark.parametrize("how", ["schedule_lora", "callback"])
@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_trainer_run_is_bitwise_that_of_a_scheduled_lora_config_model(row, how, tmp_path):
    model = row.tool_model(lora_dropout=0.1)
    start = lora_state(model)
    if how == "schedule_lora":
        schedule_lora(model, layer_schedule=row.schedule, schedule_unit="step")
        callback = LayerScheduleCallback()
    else:  # a tool that takes only callbacks (LLaMA-Factory's run_exp)
        callback = LayerScheduleCallback(layer_schedule=row.schedule, schedule_unit="step")
    trainer = run_trainer(model, row, tmp_path / "byo", [callback])

    reference = get_peft_model(row.builder(), ScheduledLoraConfig(
        r=4, lora_dropout=0.1, target_modules=list(row.targets), task_type=row.task_type,
        layer_schedule=row.schedule, schedule_unit="step", preallocate_layers=[0, 1, 2, 3], init_seed=0,
    ))
    reference.load_state_dict(start, strict=False)
    assert same(lora_state(reference), start)
    run_trainer(reference, row, tmp_path / "ref", [LayerScheduleCallback()])

    end = lora_state(model)
    assert same(end, lora_state(reference))
    before, after = by_layer(row, start), by_layer(row, end)
    assert same(before[row.spare], after[row.spare])  # never scheduled: bitwise still
    assert same(before[0], after[0])
    for layer in (row.top, row.low):  # the low layer joined at step 2: it was in the Trainer's optimizer
        changed = [n for n in before[layer] if "lora_B" in n and not torch.equal(before[layer][n], after[layer][n])]
        assert changed, layer
    assert sorted(g[LAYER_KEY] for g in trainer.optimizer.param_groups if LAYER_KEY in g) == [0, 1, 2, 3]
    switches = [(e["step"], e["active_layers"]) for e in trainer.state.log_history if "schedule_time" in e]
    assert switches == [(0, str(row.top)), (2, "{},{}".format(row.low, row.top))]


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_save_then_from_pretrained_is_the_scheduled_adapter_with_the_same_weights(row, tmp_path):
    model = schedule_lora(row.tool_model(), layer_schedule=row.schedule, schedule_unit="step")
    run_trainer(model, row, tmp_path / "run", [LayerScheduleCallback()])
    model.save_pretrained(str(tmp_path / "saved"))
    with open(os.path.join(str(tmp_path / "saved"), "adapter_config.json")) as handle:
        on_disk = json.load(handle)
    assert on_disk["peft_type"] == "SCHEDULED_LORA"
    assert on_disk["preallocate_layers"] == [0, 1, 2, 3]
    assert on_disk["ever_active_layers"] == sorted([row.low, row.top])

    loaded = PeftModel.from_pretrained(row.builder(), str(tmp_path / "saved"), is_trainable=True)
    assert type(loaded.base_model).__name__ == "ScheduledLoraModel"
    assert loaded.preallocated_layers == [0, 1, 2, 3]
    assert loaded.ever_active_layers == sorted([row.low, row.top])
    assert same(lora_state(loaded), lora_state(model))
    assert torch.equal(eval_logits(loaded, row), eval_logits(model, row))
    assert loaded.activate_layers(2) == sorted([row.low, row.top])


def test_resume_of_a_callback_adopted_model_is_bitwise(tmp_path):
    row = ROWS[1]

    def callback():
        return LayerScheduleCallback(layer_schedule=row.schedule, schedule_unit="step")

    whole = row.tool_model(lora_dropout=0.1)
    run_trainer(whole, row, tmp_path / "whole", [callback()], save_strategy="steps", save_steps=1)
    # The tool builds its model again for the resumed run; another LoRA init: only the checkpoint's weights
    # can make the runs meet.
    again = row.tool_model(lora_seed=1, lora_dropout=0.1)
    assert not same(lora_state(again), lora_state(row.tool_model(lora_dropout=0.1)))
    resumed = run_trainer(again, row, tmp_path / "again", [callback()], resume=str(tmp_path / "whole" / "checkpoint-1"))
    assert same(lora_state(again), lora_state(whole))
    switches = [(e["step"], e["active_layers"]) for e in resumed.state.log_history if "schedule_time" in e]
    assert switches[-1] == (2, "{},{}".format(row.low, row.top))


@pytest.mark.parametrize("row", ROWS, ids=repr)
def test_layer_scheduler_adopts_in_a_plain_loop(row):
    model = row.tool_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = LayerScheduler(model, optimizer, unit="step", layer_schedule=row.schedule)
    start = by_layer(row, lora_state(model))
    model.train()
    for step in range(4):
        out = model(**row.inputs()).logits
        out.float().pow(2).mean().backward()
        optimizer.step()
        sched.step()
        optimizer.zero_grad()
        if step == 1:
            assert same(by_layer(row, lora_state(model))[row.low], start[row.low])
    sched.finish()
    end = by_layer(row, lora_state(model))
    assert same(end[row.spare], start[row.spare]) and same(end[0], start[0])
    assert not same(end[row.low], start[row.low]) and not same(end[row.top], start[row.top])


def test_a_reference_adapter_beside_the_scheduled_one_keeps_its_grads_and_schedule():
    # TRL's DPO/GRPO with a pre-built PeftModel: add_adapter("ref", <the adapter's config>), weights copied,
    # and set_adapter("ref") / set_adapter("default") around each reference pass, between micro-batches.
    row = ROWS[1]
    model = schedule_lora(row.tool_model(), layer_schedule=row.schedule, schedule_unit="step")
    model.activate_layers(2)
    model.add_adapter("ref", model.peft_config["default"])
    assert model.peft_config["ref"] is not model.peft_config["default"]
    model.train()
    model(**row.inputs()).logits.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".default." in n and row.layer_of(n) in (row.low, row.top) for n in grads)
    model.set_adapter("ref")
    with torch.no_grad():
        model(**row.inputs())
    model.set_adapter("default")
    with model.disable_adapter():
        with torch.no_grad():
            model(**row.inputs())
    kept = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert same(kept, grads)  # an accumulation window's grads survive the reference passes
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains == {n for n in lora_state(model) if ".default." in n and row.layer_of(n) in (row.low, row.top)}
    assert model.active_layers == sorted([row.low, row.top])


# ------------------------------------------------------------------------------------------------ errors


def test_a_model_without_peft_is_refused():
    with pytest.raises(TypeError, match=r"needs a PeftModel with a LoRA adapter .*get_peft_model"):
        schedule_lora(tiny_models.llama(), layer_schedule={0: [3]})


def test_a_non_lora_peft_model_is_refused():
    model = get_peft_model(tiny_models.llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(TypeError, match=r"LoRA adapters only.*PROMPT_TUNING.*peft.LoraConfig"):
        schedule_lora(model, layer_schedule={0: [3]})


def test_a_schedule_on_layers_without_lora_names_them_and_changes_nothing():
    row = ROWS[1]
    model = row.tool_model(target_modules=r"model\.layers\.[23]\.self_attn\.(q_proj|v_proj)")
    with pytest.raises(ValueError, match=r"layer\(s\) \[0, 1\], which have no LoRA .*LoRA sits in layer\(s\) \[2, 3\]"):
        schedule_lora(model, layer_schedule={0: [3], 2: [0, 1, 3]})
    assert type(model.base_model).__name__ == "LoraModel"
    assert type(model.peft_config["default"]) is LoraConfig
    # A schedule without its own layers draws from the layers that hold LoRA.
    schedule_lora(model, layer_schedule={"type": "gradual", "k": 1, "n": 1, "every": 1})
    assert model.preallocated_layers == [2, 3] and model.activate_layers(1) == [2, 3]


def test_lora_outside_the_layer_stacks_is_refused():
    model = ROWS[1].tool_model(target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"outside the layer stacks .*\['lm_head'\]"):
        schedule_lora(model, layer_schedule={0: [3]})


def test_an_already_scheduled_adapter_and_bad_arguments_are_refused():
    row = ROWS[1]
    model = schedule_lora(row.tool_model(), layer_schedule=row.schedule)
    with pytest.raises(ValueError, match=r"already has a layer schedule .*set_layer_schedule"):
        schedule_lora(model, layer_schedule={0: [1]})
    with pytest.raises(ValueError, match=r"no adapter 'other'; its adapters: \['default'\]"):
        schedule_lora(row.tool_model(), layer_schedule=row.schedule, adapter_name="other")
    with pytest.raises(ValueError, match=r"schedule_unit='steps' is not supported"):
        schedule_lora(row.tool_model(), layer_schedule=row.schedule, schedule_unit="steps")
    with pytest.raises(ValueError, match=r"needs a layer_schedule"):
        schedule_lora(row.tool_model(), layer_schedule=None)
    with pytest.raises(ValueError, match=r"schedule_unit='step'\) without layer_schedule"):
        LayerScheduleCallback(schedule_unit="step")


def test_a_callback_schedule_must_agree_with_the_models_own(tmp_path):
    row = ROWS[1]
    model = schedule_lora(row.tool_model(), layer_schedule=row.schedule, schedule_unit="step")
    # The same schedule again (one callback reused for a second stage) is fine:
    run_trainer(model, row, tmp_path / "a", [LayerScheduleCallback(layer_schedule=row.schedule, schedule_unit="step")])
    with pytest.raises(ValueError, match=r"already has layer_schedule=.*Give the schedule in one place"):
        run_trainer(model, row, tmp_path / "b", [LayerScheduleCallback(layer_schedule={0: [1]}, schedule_unit="step")])


def test_a_plain_lora_model_without_a_schedule_is_refused_with_the_way_to_schedule_it(tmp_path):
    row = ROWS[1]
    with pytest.raises(TypeError, match=r"plain LoraConfig: schedule it with peft_layersched.schedule_lora"):
        run_trainer(row.tool_model(), row, tmp_path, [LayerScheduleCallback()])


def test_a_peft_model_inside_a_wrapper_is_adopted_there():
    row = ROWS[1]
    model = row.tool_model()
    wrapper = torch.nn.ModuleList([model])  # as DDP / torch.compile hold it
    assert schedule_lora(wrapper, layer_schedule=row.schedule) is wrapper
    assert type(model.base_model).__name__ == "ScheduledLoraModel" and model.active_layers == [row.top]


def _lora_this_peft_builds(row, **fields):
    try:
        return row.tool_model(**fields)
    except (TypeError, ValueError) as exc:  # a field this PEFT lacks, or a target it does not match
        pytest.skip("this PEFT does not build LoraConfig({}): {}".format(fields, exc))


# LoRA modules that the saved config's target_modules, read by this package inside the preallocated layers, would
# not give back: PEFT 0.3's target_modules suffix rule ("proj" matches "q_proj"), or exclude_modules (PEFT >= 0.14).
REBUILD_CASES = {
    "suffix": {"target_modules": ["proj"]},
    "exclude": {"exclude_modules": ["model.layers.2.self_attn.v_proj"]},
}


@pytest.mark.parametrize("kind", sorted(REBUILD_CASES))
def test_the_saved_adapter_loads_back_module_for_module(kind, tmp_path):
    row = ROWS[1]
    model = _lora_this_peft_builds(row, **REBUILD_CASES[kind])
    schedule_lora(model, layer_schedule={0: [3], 1: [2, 3]}, schedule_unit="step")
    model.activate_layers(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and row.layer_of(name) in (2, 3):
                param.add_(0.1)  # "trained"
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(row.builder(), str(tmp_path))
    assert set(lora_state(loaded)) == set(lora_state(model))
    assert same(lora_state(loaded), lora_state(model))
    assert torch.equal(eval_logits(loaded, row), eval_logits(model, row))
