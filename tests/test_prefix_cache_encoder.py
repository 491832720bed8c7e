"""The frozen-prefix cache on an encoder-decoder model: a frozen encoder's output is kept and reused."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import CallCounter, assert_same_lora, needs_torch2, plain_run, word_tokenizer
from torch.utils.data import Dataset

from peft_layersched import LayerScheduler, PrefixCache

from helpers.scheduled_cases import lora_params

DECODER = ["decoder.0", "decoder.1"]
pytestmark = needs_torch2


def t5(schedule=None, dropout=0.0, lora_dropout=0.0, **config):
    """A tiny T5 (2 encoder + 2 decoder blocks) built from its config, scheduled by ``schedule``."""
    from peft import get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from peft_layersched import ScheduledLoraConfig

    torch.manual_seed(0)
    base = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        dropout_rate=dropout, decoder_start_token_id=0, pad_token_id=0))
    fields = dict(r=4, target_modules=["q", "v"], layer_schedule=schedule or {0: DECODER}, schedule_unit="epoch",
                  lora_dropout=lora_dropout, init_seed=0)
    fields.update(config)
    return get_peft_model(base, ScheduledLoraConfig(**fields))


def bart(encoder_layerdrop=0.0):
    """A tiny BART (2 + 2 layers) without dropout, its decoder layers scheduled."""
    from peft import get_peft_model
    from transformers import BartConfig, BartForConditionalGeneration

    from peft_layersched import ScheduledLoraConfig

    torch.manual_seed(0)
    base = BartForConditionalGeneration(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, encoder_layerdrop=encoder_layerdrop, decoder_layerdrop=0.0,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None))
    config = ScheduledLoraConfig(r=4, target_modules=["q_proj", "v_proj"], layer_schedule={0: DECODER},
                                 schedule_unit="epoch", lora_dropout=0.0, init_seed=0)
    return get_peft_model(base, config)


class Pairs(Dataset):
    """Sources of 4..12 tokens; the target is the source's first 2..6 tokens reversed."""

    def __init__(self, n=24, seed=0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 13, (n,), generator=generator).tolist()
        self.sources = [torch.randint(1, 64, (k,), generator=generator).tolist() for k in lengths]

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, i):
        source = self.sources[i]
        return {"input_ids": source, "attention_mask": [1] * len(source),
                "labels": source[: 2 + len(source) % 5][::-1]}


# Dynamic padding to even lengths: before transformers 5 T5's attention is eager, and on CPU its batched
# matmul rounds odd lengths (9, 11 here) differently by a row's place in the batch, so a kept row would
# differ from a recomputed one in the last bit (docs/performance.md, "Frozen-prefix cache").
MULTIPLE = 2


def pad(features, length=None):
    """Right padding (id 0; labels -100), to ``length`` or the batch's longest row (rounded up to even)."""
    length = length or -(-max(len(f["input_ids"]) for f in features) // MULTIPLE) * MULTIPLE
    targets = max(len(f["labels"]) for f in features)
    ids = torch.zeros((len(features), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(features), targets), -100, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
        labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_fixed(features):
    return pad(features, 12)


def loop_run(model, epochs, prefix_cache=None, collate=pad, on_epoch=None):
    """``plain_run`` over Pairs (shuffled, batches of 5): the finished scheduler's last metrics and cache."""
    sched = plain_run(model, epochs, prefix_cache, on_epoch=on_epoch, collate=collate, data=Pairs())
    return sched.final_metrics, sched.closed_cache


def test_a_cached_plain_loop_with_dynamic_padding_trains_bitwise_as_an_uncached_one():
    uncached, cached = t5(), t5()
    loop_run(uncached, 4)
    metrics, cache = loop_run(cached, 4, prefix_cache=True)
    assert_same_lora(uncached, cached)
    assert metrics["layer_schedule/prefix_cache_hits"] > 0, metrics
    assert metrics["layer_schedule/prefix_cache_boundary"] == 2.0  # decoder.0, after the 2 encoder layers
    assert cache.store.ram_bytes == 0 and "forward" not in cached.base_model.model.encoder.__dict__


def test_on_an_all_hit_batch_the_encoder_does_not_run():
    model = t5()
    encoder = model.base_model.model.encoder
    blocks = [CallCounter(block) for block in encoder.block]
    embed = CallCounter(encoder.embed_tokens)
    both = int(encoder.embed_tokens is model.base_model.model.decoder.embed_tokens)  # one module before tf 5
    outputs = []
    encoder.register_forward_hook(lambda module, args, output: outputs.append(type(output)))
    seen = []
    metrics, _ = loop_run(model, 3, prefix_cache=True, collate=pad_fixed,
                          on_epoch=lambda epoch, s: seen.append([c.calls for c in blocks] + [embed.calls]))
    assert seen[0] == [5, 5, 5 * (1 + both)], seen  # epoch 0 records: 5 batches
    # Later epochs: no encoder block, and its embedding only where the decoder calls the same module.
    assert seen[1] == [5, 5, 5 * (1 + 2 * both)] and seen[2] == [5, 5, 5 * (1 + 3 * both)], seen
    assert metrics["layer_schedule/prefix_cache_misses"] == 24.0
    assert metrics["layer_schedule/prefix_cache_hits"] == 2 * 24.0
    assert len(set(outputs)) == 1 and outputs[0].__name__.startswith("BaseModelOutput"), outputs


def test_a_served_call_returns_what_the_encoder_returns_with_and_without_return_dict():
    model = t5()
    encoder = model.base_model.model.encoder
    blocks = CallCounter(encoder.block[0])
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    sched = LayerScheduler(model, optimizer, total_epochs=2, prefix_cache=True)
    model.train()
    batch = pad([Pairs()[i] for i in range(3)])
    expected = model(**batch).loss  # recorded (the encoder runs)
    assert blocks.calls == 1
    assert torch.equal(model(**batch).loss, expected) and blocks.calls == 1  # served
    as_tuple = model(**batch, return_dict=False)  # (older transformers pass return_dict to the encoder: runs)
    calls = blocks.calls
    assert torch.equal(model(**batch, return_dict=False)[0], expected) and torch.equal(as_tuple[0], expected)
    assert blocks.calls == calls  # served
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "return_dict": False}
    ran, calls = encoder(**inputs), blocks.calls
    served = encoder(**inputs)
    assert blocks.calls == calls and isinstance(ran, tuple) and type(served) is type(ran) and len(served) == len(ran)
    assert torch.equal(served[0], ran[0])
    given = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hits, misses = sched.prefix.hits, sched.prefix.misses
    out = model(**batch, encoder_outputs=given)  # the caller's encoder output: used as given
    assert torch.equal(out.loss, expected) and (sched.prefix.hits, sched.prefix.misses) == (hits, misses)
    sched.finish()


def test_a_trainer_run_with_the_seq2seq_collator_trains_bitwise_as_an_uncached_one(tmp_path):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback

    from peft_layersched import LayerScheduleCallback

    from helpers.toy_training import training_args

    class KeepMetrics(TrainerCallback):
        """The cache's metrics at each epoch's end (the scheduler drops its cache at the run's end)."""

        def __init__(self, source):
            self.source, self.metrics = source, {}

        def on_epoch_end(self, args, state, control, **kwargs):
            self.metrics.update(self.source.tracker_scalars())

    def run(model, out, prefix_cache):
        callback = LayerScheduleCallback(prefix_cache=prefix_cache)
        keep = KeepMetrics(callback)
        collator = DataCollatorForSeq2Seq(word_tokenizer(), pad_to_multiple_of=MULTIPLE)  # (labels: -100)
        Trainer(model=model, args=training_args(out, num_train_epochs=3, per_device_train_batch_size=5,
                                                logging_steps=50, remove_unused_columns=False),
                train_dataset=Pairs(), data_collator=collator, callbacks=[callback, keep]).train()
        return keep.metrics

    uncached, cached = t5(), t5()
    run(uncached, tmp_path / "a", None)
    metrics = run(cached, tmp_path / "b", True)
    assert_same_lora(uncached, cached)
    assert metrics["layer_schedule/prefix_cache_hits"] > 0, metrics


class EvalEncoder(object):
    """The uncached reference of eval_prefix: the encoder in eval mode at every training forward."""

    def __init__(self, model):
        self.encoder = model.base_model.model.get_encoder()
        model.base_model.model.register_forward_pre_hook(self._eval)

    def _eval(self, module, args):
        if module.training:
            self.encoder.eval()


def test_eval_prefix_runs_the_encoder_without_dropout_bitwise_as_an_uncached_run_that_does_the_same():
    uncached, cached = t5(dropout=0.1, lora_dropout=0.1), t5(dropout=0.1, lora_dropout=0.1)
    EvalEncoder(uncached)
    loop_run(uncached, 3, collate=pad_fixed)
    metrics, _ = loop_run(cached, 3, prefix_cache=PrefixCache(eval_prefix=True), collate=pad_fixed)
    assert_same_lora(uncached, cached)
    assert metrics["layer_schedule/prefix_cache_hits"] == 2 * 24.0
    # The decoder kept its dropout: a run without any dropout differs.
    plain = t5()
    loop_run(plain, 3, collate=pad_fixed)
    a, b = lora_params(plain), lora_params(cached)
    assert any(not torch.equal(a[name], b[name]) for name in a)


def test_encoder_dropout_without_eval_prefix_is_refused():
    model = t5(dropout=0.1)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"encoder has dropout.*dropout_rate.*PrefixCache\(eval_prefix=True\)"):
        LayerScheduler(model, optimizer, total_epochs=3, prefix_cache=True)


def test_the_cache_is_off_while_an_encoder_layer_trains_and_on_after_it_froze():
    schedule = {0: ["encoder.1"] + DECODER, 2: DECODER}
    uncached, cached = t5(schedule), t5(schedule)
    loop_run(uncached, 4, collate=pad_fixed)
    seen = []
    loop_run(cached, 4, prefix_cache=True, collate=pad_fixed,
             on_epoch=lambda epoch, s: seen.append((s.prefix.on, s.prefix.hits, s.prefix.misses)))
    assert_same_lora(uncached, cached)
    assert seen == [(False, 0, 0), (False, 0, 0), (True, 0, 24), (True, 24, 24)], seen


def test_autofreeze_turns_the_cache_on_once_it_froze_the_encoder_and_stays_bitwise():
    spec = {"type": "autofreeze", "every": 2, "percentile": 50}
    uncached, cached = t5(spec, schedule_unit="step"), t5(spec, schedule_unit="step")
    plain_run(uncached, 6, data=Pairs(), collate=pad, total_steps=30)
    seen = []
    plain_run(cached, 6, True, data=Pairs(), collate=pad, total_steps=30,
              on_epoch=lambda epoch, s: seen.append((s.prefix.boundary, s.prefix.on, s.prefix.hits)))
    assert_same_lora(uncached, cached)
    assert seen[0] == (0, False, 0) and seen[-1][1] and seen[-1][2] > 0, seen
    assert [b for b, _, _ in seen] == sorted(b for b, _, _ in seen) and seen[-1][0] > 2, seen


def test_schedules_that_train_the_encoder_again_or_never_freeze_it_are_refused():
    for schedule, match in [({0: DECODER, 2: ["encoder.0"] + DECODER}, "trains encoder layers again"),
                            ({0: ["encoder.0", "decoder.1"]}, "would never be used")]:
        model = t5(schedule)
        optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
        with pytest.raises(ValueError, match=match):
            LayerScheduler(model, optimizer, total_epochs=4, prefix_cache=True)
    # Down-and-up moves inside the decoder leave the encoder frozen: accepted.
    model = t5({0: ["decoder.1"], 1: DECODER, 2: ["decoder.1"]})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    LayerScheduler(model, optimizer, total_epochs=4, prefix_cache=True).finish()


def test_a_trainable_shared_embedding_is_refused():
    model = t5(modules_to_save=["shared"])
    assert any(p.requires_grad for p in model.base_model.model.get_input_embeddings().parameters())
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"parameters of the encoder or its input embeddings train"):
        LayerScheduler(model, optimizer, total_epochs=3, prefix_cache=True)


def test_hidden_states_outputs_are_refused_while_cached():
    model = t5()
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    LayerScheduler(model, optimizer, total_epochs=2, prefix_cache=True)
    model.train()
    with pytest.raises(ValueError, match="output_hidden_states is requested, but the encoder does not run"):
        model(**pad([Pairs()[0]]), output_hidden_states=True)


def test_bart_with_eval_prefix_trains_bitwise_as_an_uncached_run_with_its_encoder_in_eval_mode():
    # (BART's encoder draws a LayerDrop number per layer in training mode before transformers 5, even at 0.)
    uncached, cached = bart(), bart()
    EvalEncoder(uncached)
    loop_run(uncached, 3)
    metrics, _ = loop_run(cached, 3, prefix_cache=PrefixCache(eval_prefix=True))
    assert_same_lora(uncached, cached)
    assert metrics["layer_schedule/prefix_cache_hits"] > 0, metrics


def test_an_encoder_that_draws_random_numbers_is_refused_at_its_first_recorded_batch():
    model = bart(encoder_layerdrop=0.1)
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    LayerScheduler(model, optimizer, total_epochs=2, prefix_cache=True)
    model.train()
    with pytest.raises(ValueError, match=r"draws random numbers in training mode.*eval_prefix=True"):
        model(**pad([Pairs()[0], Pairs()[1]]))
