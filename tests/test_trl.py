"""TRL as a client: SFTTrainer(peft_config=ScheduledLoraConfig(...), callbacks=[LayerScheduleCallback()])."""

from __future__ import annotations

import pytest
import torch

from peft_layersched import LayerScheduleCallback, LayerScheduleTrainerMixin, ScheduledLoraConfig
from peft_layersched.training.engines import LAYER_KEY

from helpers import tiny_models
from helpers.snapshots import lora

trl = pytest.importorskip("trl", reason="TRL is installed only in the newest tox env (peft0212-tf5)")
datasets = pytest.importorskip("datasets", reason="TRL's datasets dependency is missing")

pytestmark = pytest.mark.slow  # TRL trainer runs

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "a", "big", "red", "ball"]


def _tokenizer():
    # No hub: a word-level tokenizer over the toy vocabulary, built on the fly.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


class ScheduledSFTTrainer(LayerScheduleTrainerMixin, trl.SFTTrainer):
    pass


@pytest.mark.parametrize("mixin,plain", [(False, False), (True, False), (False, True)],
                         ids=["class-wrappers", "mixin", "plain LoraConfig"])
def test_sft_trainer_runs_the_schedule(tmp_path, mixin, plain):
    from peft import LoraConfig

    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) for i in range(16)]
    schedule = {0: [3], 2: [0, 3]}
    fields = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if plain:  # SFTTrainer builds plain LoRA on every layer; the callback schedules it
        config = LoraConfig(lora_alpha=8, lora_dropout=0.0, **fields)
        callback = LayerScheduleCallback(layer_schedule=schedule, schedule_unit="step")
    else:
        config = ScheduledLoraConfig(layer_schedule=schedule, schedule_unit="step", init_seed=0, **fields)
        callback = LayerScheduleCallback()
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
        bf16=False,
    )
    trainer = (ScheduledSFTTrainer if mixin else trl.SFTTrainer)(
        model=tiny_models.llama(),
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": texts}),
        processing_class=_tokenizer(),
        peft_config=config,
        callbacks=[callback],
    )
    assert type(trainer.model.base_model).__name__ == "ScheduledLoraModel"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    switches = [(e["step"], e["active_layers"]) for e in trainer.state.log_history if "schedule_time" in e]
    assert switches == [(0, "3"), (2, "0,3")]
    changed = {
        n.split("layers.")[1].split(".")[0]
        for n, p in trainer.model.named_parameters()
        if "lora_B" in n and not torch.equal(p, before[n])
    }
    assert changed == {"0", "3"}, "the layer that joined at step 2 never trained under SFTTrainer"
    layers = sorted(g[LAYER_KEY] for g in trainer.optimizer.param_groups if LAYER_KEY in g)
    # A param group per preallocated layer, through either mechanism (plain LoRA sits on every layer).
    assert layers == ([0, 1, 2, 3] if plain else [0, 3])
    assert any("layer_schedule/lr/0" in r for r in trainer.state.log_history)


# ------------------------------------------------------------------ preference and RL trainers (DPO, GRPO)

SCHEDULE = {0: [3], 2: [1, 3]}  # layer 2 carries LoRA (preallocated) but is never scheduled, layer 0 too


def _layer(name):
    return int(name.split("layers.")[1].split(".")[0])


def _trainer_model(how):
    """``(model, peft_config, callback)`` for one way of scheduling: ``peft_config=`` a ScheduledLoraConfig;
    a tool's plain-LoRA PeftModel scheduled by ``schedule_lora``; or one that the callback schedules."""
    from peft import LoraConfig, get_peft_model

    from peft_layersched import schedule_lora

    fields = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    if how == "peft_config":
        config = ScheduledLoraConfig(layer_schedule=SCHEDULE, schedule_unit="step", preallocate_layers=[0, 1, 2, 3],
                                     init_seed=0, **fields)
        return tiny_models.llama(), config, LayerScheduleCallback()
    model = get_peft_model(tiny_models.llama(), LoraConfig(**fields))
    if how == "schedule_lora":
        return schedule_lora(model, layer_schedule=SCHEDULE, schedule_unit="step"), None, LayerScheduleCallback()
    return model, None, LayerScheduleCallback(layer_schedule=SCHEDULE, schedule_unit="step")


def _check_schedule_held(trainer, before):
    model = trainer.model
    after = lora(model)
    changed = {_layer(n) for n in after if ".default." in n and not torch.equal(after[n], before[n])}
    assert changed == {1, 3}, "frozen layers moved, or an active one did not train"
    assert all(torch.equal(after[n], before[n]) for n in after if ".default." not in n)  # TRL's "ref" copy
    switches = [(e["step"], e["active_layers"]) for e in trainer.state.log_history if "schedule_time" in e]
    assert switches == [(0, "3"), (2, "1,3")]
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert {_layer(n) for n in trained} == {1, 3} and all(".default." in n for n in trained)


HOWS = ["peft_config", "schedule_lora", "callback"]


def _run_each_way(make_trainer):
    """Train once per way of scheduling from the same LoRA weights; checks that the schedule held and that the
    three runs end bitwise alike (the reference pass is the base model, through disable_adapter() or TRL's
    "ref" copy of a zero-B adapter: the same logits)."""
    start, ends = None, {}
    for how in HOWS:
        model, peft_config, callback = _trainer_model(how)
        trainer = make_trainer(model, peft_config, callback, how)
        assert ("ref" in trainer.model.peft_config) == (how != "peft_config")  # TRL copies a pre-built adapter
        if start is None:
            start = {n: v for n, v in lora(trainer.model).items() if ".default." in n}
        else:
            trainer.model.load_state_dict(start, strict=False)
        before = lora(trainer.model)
        trainer.train()
        _check_schedule_held(trainer, before)
        ends[how] = {n: v for n, v in lora(trainer.model).items() if ".default." in n}
    for how in HOWS[1:]:
        assert all(torch.equal(ends[how][n], ends[HOWS[0]][n]) for n in start), how


def test_dpo_trainer_keeps_the_schedule(tmp_path):
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3)) for i in range(8)]
    data = datasets.Dataset.from_dict({
        "prompt": prompts,
        "chosen": [" " + WORDS[i % len(WORDS)] + " mat" for i in range(8)],
        "rejected": [" " + WORDS[(i + 5) % len(WORDS)] + " dog" for i in range(8)],
    })

    def make_trainer(model, peft_config, callback, how):
        # Two micro-batches per step: the reference pass of the second runs inside the accumulation window.
        args = trl.DPOConfig(
            output_dir=str(tmp_path / how), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, report_to="none", save_strategy="no",
            logging_steps=1, max_length=16, disable_tqdm=True, bf16=False, beta=0.1, seed=0,
        )
        return trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                              peft_config=peft_config, callbacks=[callback])

    _run_each_way(make_trainer)


def _reward_len(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_grpo_trainer_keeps_the_schedule(tmp_path):
    prompts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3)) for i in range(8)]

    def make_trainer(model, peft_config, callback, how):
        tokenizer = _tokenizer()
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / how), max_steps=4, per_device_train_batch_size=4, num_generations=2,
            max_completion_length=4, learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, bf16=False, beta=0.1, seed=0,
        )
        return trl.GRPOTrainer(model=model, reward_funcs=[_reward_len], args=args,
                               train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                               processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])

    _run_each_way(make_trainer)
