"""TRL as a client: SFTTrainer(peft_config=ScheduledLoraConfig(...), callbacks=[LayerScheduleCallback()])."""

from __future__ import annotations

import pytest
import torch

from peft_layersched import LayerScheduleCallback, LayerScheduleTrainerMixin, ScheduledLoraConfig
from peft_layersched.engines import LAYER_KEY

from helpers import tiny_models

trl = pytest.importorskip("trl", reason="TRL is installed only in the newest tox env (peft0212-tf5)")
datasets = pytest.importorskip("datasets", reason="TRL's datasets dependency is missing")

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


@pytest.mark.parametrize("mixin", [False, True], ids=["class-wrappers", "mixin"])
def test_sft_trainer_runs_the_schedule(tmp_path, mixin):
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(6)) for i in range(16)]
    config = ScheduledLoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        layer_schedule={0: [3], 2: [0, 3]},
        schedule_unit="step",
        task_type="CAUSAL_LM",
        init_seed=0,
    )
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
        callbacks=[LayerScheduleCallback()],
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
    assert layers == [0, 3]  # a param group per scheduled layer, through either mechanism
    assert any("layer_schedule/lr/0" in r for r in trainer.state.log_history)
