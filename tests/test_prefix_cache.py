"""The frozen-prefix activation cache: cached runs train bitwise as uncached ones, and skip the prefix."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from peft_layersched import LayerScheduler, PrefixCache

from helpers.launch import two_ranks
from helpers.scheduled_cases import BY_FAMILY, lora_params

NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Older transformers' LLaMA layers return their KV cache too when use_cache is on (refused: skipped layers
# cannot give it); training needs no cache.
LLAMA = {"use_cache": False}
OLD_TORCH = int(torch.__version__.split(".")[0]) < 2
# The cache needs torch >= 2.0; on older torch only its refusal is tested (the last test).
needs_torch2 = pytest.mark.skipif(OLD_TORCH, reason="prefix_cache needs torch >= 2.0 (refused there: tested)")


class VariableLength(Dataset):
    """Sequences of 4..12 tokens; the label is whether token 7 appears."""

    def __init__(self, n=24, seed=0):
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 13, (n,), generator=generator).tolist()
        self.rows = [torch.randint(1, 99, (k,), generator=generator) for k in lengths]
        for row in self.rows[: n // 2]:
            row[0] = 7
        self.labels = [int((row == 7).any()) for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i].tolist(), "labels": self.labels[i]}


def pad_right(features, length=None):
    """Right padding (pad id 0) to ``length``, default the batch's longest row, with the attention mask."""
    length = length or max(len(f["input_ids"]) for f in features)
    ids = torch.zeros((len(features), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def bert(schedule, layers=4, base=None, **config):
    fields = dict(NO_DROPOUT, **(base or {}))
    config = dict(dict(schedule_unit="epoch", task_type="SEQ_CLS", lora_dropout=0.0), **config)
    return BY_FAMILY["bert"].build(base=dict(num_layers=layers, **fields), layer_schedule=schedule, **config)


def pad_fixed(features):
    return pad_right(features, 12)


def plain_run(model, epochs, prefix_cache=None, batch_size=5, on_epoch=None, collate=pad_fixed, data=None, **options):
    """A plain loop with shuffling over ``data`` (default VariableLength()); returns the scheduler (finished)."""
    torch.manual_seed(0)
    loader = DataLoader(data or VariableLength(), batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    sched = LayerScheduler(model, optimizer, total_epochs=epochs, prefix_cache=prefix_cache, **options)
    model.train()
    for epoch in range(epochs):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
        if on_epoch is not None:
            on_epoch(epoch, sched)
        sched.epoch_end()
    metrics = sched.metrics()
    cache = sched.prefix
    sched.finish()
    sched.final_metrics, sched.closed_cache = metrics, cache
    return sched


def assert_same_lora(a, b):
    pa, pb = lora_params(a), lora_params(b)
    assert pa.keys() == pb.keys()
    different = [name for name in pa if not torch.equal(pa[name], pb[name])]
    assert not different, different


class CallCounter(object):
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.calls += 1


@needs_torch2
def test_a_cached_plain_loop_trains_bitwise_as_an_uncached_one_and_skips_the_prefix():
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    # (Modules inside the prefix: the patched modules' own __call__ still runs, their work does not.)
    counters = [CallCounter(cached.base_model.model.bert.embeddings.word_embeddings),
                CallCounter(cached.base_model.model.bert.encoder.layer[1].attention)]
    seen = []
    plain_run(uncached, 4)
    sched = plain_run(cached, 4, prefix_cache=True,
                      on_epoch=lambda epoch, s: seen.append([c.calls for c in counters]))
    assert_same_lora(uncached, cached)
    # epoch 0 records (every batch runs the prefix), the later epochs run nothing below layer 2.
    assert seen[0][0] == 5 and seen[-1] == seen[0], seen
    metrics = sched.final_metrics
    assert metrics["layer_schedule/prefix_cache_boundary"] == 2.0
    assert metrics["layer_schedule/prefix_cache_misses"] == 24.0
    assert metrics["layer_schedule/prefix_cache_hits"] == 3 * 24.0
    assert metrics["layer_schedule/prefix_cache_bytes"] > 0
    assert sched.prefix is None and sched.closed_cache.store.ram_bytes == 0  # nothing kept after the run
    assert "forward" not in cached.base_model.model.bert.embeddings.__dict__  # the patches are gone


@needs_torch2
def test_with_dynamic_padding_rows_hit_at_their_padded_length_and_training_stays_bitwise():
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    plain_run(uncached, 5, collate=pad_right)
    sched = plain_run(cached, 5, prefix_cache=True, collate=pad_right)
    assert_same_lora(uncached, cached)
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] > 0


@needs_torch2
def test_any_pad_length_hits_under_any_right_padding_to_float_rounding():
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    plain_run(uncached, 4, collate=pad_right)
    sched = plain_run(cached, 4, prefix_cache=PrefixCache(any_pad_length=True), collate=pad_right)
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] == 3 * 24.0
    a, b = lora_params(uncached), lora_params(cached)
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)


def word_tokenizer():
    """A word-level fast tokenizer over the ids 0..98 ("t<id>"), built in memory, pad id 0."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"t{}".format(i): i for i in range(99)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", unk_token="t1")


class TokenRows(Dataset):
    def __init__(self, labels):
        self.data, self.labels = VariableLength(), labels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = self.data[i]
        out = {"input_ids": row["input_ids"], "attention_mask": [1] * len(row["input_ids"])}
        if self.labels:
            out["labels"] = row["labels"]
        return out


def trainer_run(model, out, prefix_cache, family, accumulation=1, **args):
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer

    from peft_layersched import LayerScheduleCallback

    from helpers.toy_training import training_args

    tokenizer = word_tokenizer()
    collator = (DataCollatorWithPadding(tokenizer) if family == "bert"
                else DataCollatorForLanguageModeling(tokenizer, mlm=False))
    callback = LayerScheduleCallback(prefix_cache=prefix_cache)
    trainer = Trainer(model=model, args=training_args(out, num_train_epochs=4, per_device_train_batch_size=5,
                                                      logging_steps=50, gradient_accumulation_steps=accumulation,
                                                      remove_unused_columns=False, **args),
                      train_dataset=TokenRows(labels=family == "bert"), data_collator=collator,
                      callbacks=[callback])
    metrics = {}
    original = callback.on_epoch_end

    def keep_metrics(*args, **kwargs):
        metrics.update(callback.tracker_scalars())
        return original(*args, **kwargs)

    callback.on_epoch_end = keep_metrics
    trainer.train()
    return metrics


@needs_torch2
@pytest.mark.parametrize("family,accumulation", [("bert", 1), ("llama", 1), ("bert", 2)])
def test_a_trainer_run_with_dynamic_padding_trains_bitwise_as_an_uncached_one(tmp_path, family, accumulation):
    def build():
        if family == "bert":
            return bert({0: [2, 3]})
        return BY_FAMILY["llama"].build(base=LLAMA, layer_schedule={0: [2, 3]}, schedule_unit="epoch", lora_dropout=0.0)

    uncached, cached = build(), build()
    trainer_run(uncached, tmp_path / "a", None, family, accumulation)
    metrics = trainer_run(cached, tmp_path / "b", True, family, accumulation)
    assert_same_lora(uncached, cached)
    assert metrics["layer_schedule/prefix_cache_hits"] > 0, metrics


class EvalBelow(object):
    """The uncached reference of eval_prefix: the embeddings and layers below ``boundary`` in eval mode at
    every forward of the backbone (as the cache does)."""

    def __init__(self, model, boundary):
        self.bert = model.base_model.model.bert
        self.modules = [self.bert.embeddings] + list(self.bert.encoder.layer)[:boundary]
        self.bert.register_forward_pre_hook(self._eval)

    def _eval(self, module, args):
        if module.training:
            for prefix in self.modules:
                prefix.eval()


@needs_torch2
def test_eval_prefix_runs_the_prefix_without_dropout_bitwise_as_an_uncached_run_that_does_the_same():
    dropout = {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    uncached = bert({0: [2, 3]}, base=dropout, lora_dropout=0.1)
    cached = bert({0: [2, 3]}, base=dropout, lora_dropout=0.1)
    EvalBelow(uncached, 2)
    plain_run(uncached, 3)
    sched = plain_run(cached, 3, prefix_cache=PrefixCache(eval_prefix=True))
    assert_same_lora(uncached, cached)
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] == 2 * 24.0
    # The layers above the boundary kept their dropout: a run without any dropout differs.
    plain = bert({0: [2, 3]}, base=dropout, lora_dropout=0.1)
    for module in plain.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain_run(plain, 3)
    a, b = lora_params(plain), lora_params(cached)
    assert any(not torch.equal(a[name], b[name]) for name in a)


@needs_torch2
def test_prefix_dropout_without_eval_prefix_is_refused():
    model = bert({0: [2, 3]}, base={"hidden_dropout_prob": 0.1})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"dropout.*PrefixCache\(eval_prefix=True\)"):
        LayerScheduler(model, optimizer, total_epochs=3, prefix_cache=True)


@needs_torch2
def test_the_cache_is_dropped_and_rebuilt_when_milestones_move_the_boundary_up():
    schedule = {0: [1, 2, 3], 2: [2, 3]}
    uncached, cached = bert(schedule), bert(schedule)
    plain_run(uncached, 4)
    seen = []
    plain_run(cached, 4, prefix_cache=True, on_epoch=lambda epoch, s: seen.append(s.prefix.metrics()))
    assert_same_lora(uncached, cached)
    boundary = [m["layer_schedule/prefix_cache_boundary"] for m in seen]
    misses = [m["layer_schedule/prefix_cache_misses"] for m in seen]
    hits = [m["layer_schedule/prefix_cache_hits"] for m in seen]
    assert boundary == [1.0, 1.0, 2.0, 2.0]
    assert misses == [24.0, 24.0, 48.0, 48.0] and hits == [0.0, 24.0, 24.0, 48.0]


@needs_torch2
def test_autofreeze_moves_the_boundary_and_stays_bitwise():
    spec = {"type": "autofreeze", "every": 2, "percentile": 90}
    uncached, cached = bert(spec, schedule_unit="step"), bert(spec, schedule_unit="step")
    plain_run(uncached, 6, total_steps=30)
    seen = []
    plain_run(cached, 6, prefix_cache=True, total_steps=30,
              on_epoch=lambda epoch, s: seen.append((s.prefix.boundary, s.prefix.hits)))
    assert_same_lora(uncached, cached)
    boundaries = [b for b, _ in seen]
    assert 0 < boundaries[0] < boundaries[-1] and boundaries == sorted(boundaries), seen
    assert seen[-1][1] - seen[-2][1] == 24, seen  # the last epoch: every row cached


@needs_torch2
def test_the_byte_cap_stops_caching_without_dir_and_spills_to_dir(tmp_path):
    row = 12 * 32 * 4  # padded to 12 tokens x hidden 32, fp32
    every_row = 24 * row
    uncached, capped, spilled = bert({0: [2, 3]}), bert({0: [2, 3]}), bert({0: [2, 3]})
    plain_run(uncached, 3)
    sched = plain_run(capped, 3, prefix_cache=PrefixCache(max_bytes=10 * row))
    assert_same_lora(uncached, capped)
    assert 0 < sched.final_metrics["layer_schedule/prefix_cache_bytes"] <= 10 * row
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] < 2 * 24.0
    folder = tmp_path / "spill"
    seen = []
    sched = plain_run(spilled, 3, prefix_cache=PrefixCache(max_bytes=10 * row, dir=str(folder)),
                      on_epoch=lambda epoch, s: seen.append(len(list(folder.rglob("*")))))
    assert_same_lora(uncached, spilled)
    metrics = sched.final_metrics
    assert metrics["layer_schedule/prefix_cache_hits"] == 2 * 24.0
    on_disk = metrics["layer_schedule/prefix_cache_disk_bytes"]
    assert metrics["layer_schedule/prefix_cache_bytes"] == every_row and 0 < on_disk < every_row
    assert seen[0] > 1  # its folder and the rows beyond the cap; after the run nothing is left
    assert list(folder.rglob("*")) == []


def optimizer_of(model):
    return torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)


@pytest.mark.parametrize("schedule,match", [
    ({"type": "cyclic", "block": 1, "every": 1}, r"'cyclic' schedule: its lowest active layer moves down and up again"),
    ({"type": "sampled", "k": 1, "seed": 3}, r"'sampled' schedule: its lowest active layer moves down and up"),
    ({"type": "adaptive", "k": 2, "every": 3}, r"'adaptive' schedule: it may activate lower layers"),
], ids=["cyclic", "sampled", "adaptive"])
@needs_torch2
def test_schedules_whose_lowest_layer_moves_down_and_up_are_refused(schedule, match):
    model = bert(schedule)
    with pytest.raises(ValueError, match=match):
        LayerScheduler(model, optimizer_of(model), total_epochs=6, prefix_cache=True)


@needs_torch2
def test_the_lr_zero_engine_and_several_stacks_are_refused():
    model = bert({0: [2, 3]})
    with pytest.raises(ValueError, match=r"engine='lr-zero'.*requires_grad engine"):
        LayerScheduler(model, optimizer_of(model), engine="lr-zero", total_epochs=2, prefix_cache=True)
    t5 = BY_FAMILY["t5"].build(layer_schedule={0: ["encoder.2"]}, lora_dropout=0.0, schedule_unit="epoch")
    with pytest.raises(ValueError, match="encoder-decoder|one layer stack"):
        LayerScheduler(t5, optimizer_of(t5), total_epochs=2, prefix_cache=True)


@needs_torch2
def test_a_model_that_adds_to_the_embeddings_before_the_first_layer_is_refused_at_its_first_batch():
    gpt2 = BY_FAMILY["gpt2"].build(layer_schedule={0: [2, 3]}, lora_dropout=0.0, schedule_unit="epoch",
                                   base=dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    LayerScheduler(gpt2, optimizer_of(gpt2), total_epochs=2, prefix_cache=True)
    gpt2.train()
    ids = torch.randint(1, 99, (2, 7))
    with pytest.raises(ValueError, match="does not reach the first layer unchanged"):
        gpt2(input_ids=ids, labels=ids)


@needs_torch2
def test_hidden_states_outputs_are_refused_while_cached():
    model = bert({0: [2, 3]})
    LayerScheduler(model, optimizer_of(model), total_epochs=2, prefix_cache=True)
    model.train()
    with pytest.raises(ValueError, match="output_hidden_states is requested"):
        model(input_ids=torch.randint(1, 99, (2, 7)), output_hidden_states=True)


@needs_torch2
def test_prefix_cache_values_are_checked():
    from peft_layersched.training import ScheduleOptions

    assert ScheduleOptions(prefix_cache=True).prefix_cache == PrefixCache()
    assert ScheduleOptions(prefix_cache={"max_bytes": 10}).prefix_cache == PrefixCache(max_bytes=10)  # (YAML)
    assert ScheduleOptions(prefix_cache=False).prefix_cache is None
    with pytest.raises(TypeError, match="prefix_cache must be None, True, a PrefixCache"):
        LayerScheduler(bert({0: [2, 3]}), total_epochs=2, prefix_cache="yes")
    with pytest.raises(ValueError, match="must name a torch dtype"):
        PrefixCache(dtype="float17")
    with pytest.raises(ValueError, match="max_bytes"):
        PrefixCache(max_bytes=-1)


@needs_torch2
def test_a_resumed_run_starts_with_an_empty_cache_and_stays_bitwise():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    uncached = bert({0: [2, 3]})
    plain_run(uncached, 4)
    torch.manual_seed(0)
    loader = DataLoader(VariableLength(), batch_size=5, shuffle=True, collate_fn=pad_fixed,
                        generator=torch.Generator().manual_seed(1))

    def epochs(model, optimizer, sched, count):
        model.train()
        for _ in range(count):
            for batch in loader:
                model(**batch).loss.backward()
                optimizer.step()
                sched.step()
                optimizer.zero_grad(set_to_none=True)
            sched.epoch_end()

    first = bert({0: [2, 3]})
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(first), lr=1e-2)
    sched = LayerScheduler(first, optimizer, total_epochs=4, prefix_cache=True)
    epochs(first, optimizer, sched, 2)
    saved = (get_peft_model_state_dict(first), optimizer.state_dict(), sched.state_dict())
    resumed = bert({0: [2, 3]})
    set_peft_model_state_dict(resumed, saved[0])
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(resumed), lr=1e-2)
    optimizer.load_state_dict(saved[1])
    sched = LayerScheduler(resumed, optimizer, total_epochs=4, state_dict=saved[2], prefix_cache=True)
    assert sched.prefix.hits == sched.prefix.misses == 0 and sched.prefix.store.ram_bytes == 0
    epochs(resumed, optimizer, sched, 2)
    assert sched.prefix.misses == 24 and sched.prefix.hits == 24
    sched.finish()
    assert_same_lora(uncached, resumed)


def lm_batches(features):
    """Dynamic right padding whose pad positions count in the loss (labels = the padded ids)."""
    batch = pad_right(features)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["input_ids"]}


@needs_torch2
def test_a_loss_that_reads_pad_positions_stays_bitwise():
    def build():
        return BY_FAMILY["llama"].build(base=LLAMA, layer_schedule={0: [2, 3]}, schedule_unit="epoch", lora_dropout=0.0)

    uncached, cached = build(), build()
    plain_run(uncached, 5, collate=lm_batches)
    sched = plain_run(cached, 5, prefix_cache=True, collate=lm_batches)
    assert_same_lora(uncached, cached)
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] > 0


@needs_torch2
def test_gradual_unfreezing_records_again_at_each_lower_boundary_and_stays_bitwise():
    schedule = {"type": "gradual", "k": 1, "n": 1, "every": 2, "from": "top", "limit": 3}
    uncached, cached = bert(schedule), bert(schedule)
    plain_run(uncached, 6)
    seen = []
    plain_run(cached, 6, prefix_cache=True, on_epoch=lambda epoch, s: seen.append(
        (s.prefix.boundary, s.prefix.hits, s.prefix.misses)))
    assert_same_lora(uncached, cached)
    assert seen == [(3, 0, 24), (3, 24, 24), (2, 24, 48), (2, 48, 48), (1, 48, 72), (1, 72, 72)], seen


@needs_torch2
def test_a_storage_dtype_halves_the_bytes_and_trains_close_to_uncached():
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    plain_run(uncached, 3)
    sched = plain_run(cached, 3, prefix_cache=PrefixCache(dtype="bfloat16"))
    assert sched.final_metrics["layer_schedule/prefix_cache_bytes"] == 24 * 12 * 32 * 2
    assert sched.final_metrics["layer_schedule/prefix_cache_hits"] == 2 * 24.0
    a, b = lora_params(uncached), lora_params(cached)
    assert all(torch.allclose(a[name], b[name], atol=1e-2) for name in a)


@needs_torch2
@pytest.mark.slow  # 2 processes (torchrun)
def test_under_ddp_each_rank_caches_its_own_rows_and_training_stays_bitwise(tmp_path):
    import json

    two_ranks("prefix_cache_worker", tmp_path, ["ddp"], timeout=300)
    ranks = [json.load(open(str(tmp_path / "ddp{}.json".format(rank)))) for rank in (0, 1)]
    for result in ranks:
        assert result["world"] == 2
        assert result["uncached"] == result["cached"]
        assert result["hits"] > 0
    assert ranks[0]["cached"] == ranks[1]["cached"]  # DDP keeps the ranks' weights identical


@pytest.mark.skipif(not OLD_TORCH, reason="torch >= 2.0 has the forward pre-hooks the cache needs")
def test_old_torch_is_refused_with_the_version_it_needs():
    model = BY_FAMILY["bert"].build(0, base=None, layer_schedule={0: [3]}, schedule_unit="step")
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    with pytest.raises(ValueError, match=r"prefix_cache needs torch >= 2\.0"):
        LayerScheduler(model, optimizer, total_steps=4, prefix_cache=True)


class FailInEpoch(object):
    """A Trainer callback that raises at the first step of ``epoch``, after checking the cache is in use."""

    def __init__(self, epoch, folder):
        from transformers import TrainerCallback

        outer = self

        class Fail(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if int(state.epoch or 0) >= epoch:
                    outer.files_before = len(list(folder.rglob("*")))
                    raise RuntimeError("a failing step")

        self.callback, self.files_before = Fail(), None


@needs_torch2
@pytest.mark.parametrize("mixin", [False, True], ids=["patched-trainer", "mixin-trainer"])
def test_a_trainer_run_that_fails_takes_the_cache_off_the_model_and_disk(tmp_path, mixin):
    from transformers import DataCollatorWithPadding, Trainer

    from peft_layersched import LayerScheduleCallback, LayerScheduleTrainerMixin

    from helpers.toy_training import training_args

    class MixinTrainer(LayerScheduleTrainerMixin, Trainer):
        pass

    model, folder = bert({0: [2, 3]}), tmp_path / "spill"
    backbone = model.base_model.model.bert
    hooks_before = (len(backbone._forward_pre_hooks), len(backbone._forward_hooks))
    fail = FailInEpoch(2, folder)
    callback = LayerScheduleCallback(prefix_cache=PrefixCache(max_bytes=4 * 12 * 32 * 4, dir=str(folder)))
    trainer = (MixinTrainer if mixin else Trainer)(
        model=model, args=training_args(tmp_path / "out", num_train_epochs=4, per_device_train_batch_size=5,
                                        remove_unused_columns=False),
        train_dataset=TokenRows(labels=True), data_collator=DataCollatorWithPadding(word_tokenizer()),
        callbacks=[callback, fail.callback])
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.train()
    assert fail.files_before > 1  # the cache was spilling when the run failed
    assert list(folder.rglob("*")) == []
    assert (len(backbone._forward_pre_hooks), len(backbone._forward_hooks)) == hooks_before
    patched = [name for name, m in backbone.named_modules() if "forward" in m.__dict__]
    assert not patched, patched
