"""The frozen-prefix cache under a real Lightning fit (CPU, shuffled, several epochs): bitwise as the same
fit without it, rows served from the cache, its metrics logged, nothing kept after the fit.

Skipped where lightning is not installed (the tox env ``lightning`` has it).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("lightning.pytorch")

import lightning.pytorch as pl  # noqa: E402
from test_prefix_cache import VariableLength, assert_same_lora, bert, pad_fixed, pad_right  # noqa: E402

from peft_layersched import PrefixCache  # noqa: E402
from peft_layersched.lightning import LayerScheduleFinetuning  # noqa: E402

from helpers import lightning_training as lt  # noqa: E402

ROWS = 24  # VariableLength(): 24 rows, in 5 batches of 5 (the last one 4)
ROW_BYTES = 12 * 32 * 4  # one row padded to 12 tokens x hidden 32, fp32


@pytest.fixture(autouse=True)
def keep_determinism_setting():
    """Trainer(deterministic=True) switches torch's deterministic algorithms on for the whole process."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class EpochEnds(pl.Callback):
    """At each epoch's end (listed after LayerScheduleFinetuning): the cache's metrics and what ``seen`` gives."""

    def __init__(self, finetuning, seen=None):
        self.finetuning, self.seen, self.rows = finetuning, seen, []

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = self.finetuning.scheduler.prefix.metrics()
        self.rows.append((metrics, self.seen() if self.seen is not None else None))


def fit(root, model, epochs, prefix_cache=None, collate=pad_fixed, seen=None, module=lt.ScheduledModule):
    """A shuffled Lightning fit of ``model``; returns (the LayerScheduleFinetuning, its logged rows, the
    per-epoch records of a cached fit)."""
    pl.seed_everything(0, verbose=False)
    loader = DataLoader(VariableLength(), batch_size=5, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(1))
    finetuning = LayerScheduleFinetuning(prefix_cache=prefix_cache)
    callbacks = [finetuning]
    if prefix_cache is not None:
        callbacks.append(EpochEnds(finetuning, seen))
    logger = lt.MemoryLogger()
    run = lt.trainer(root, callbacks, logger=logger, max_epochs=epochs, deterministic=True)
    run.fit(module(model), loader)
    logged = [metrics for _, metrics in logger.rows if "layer_schedule/prefix_cache_hits" in metrics]
    return finetuning, logged, callbacks[-1].rows if prefix_cache is not None else None


class CallCounter(object):
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.calls += 1


def hook_counts(model):
    """How many forward hooks the backbone, its embeddings and each layer hold (the cache adds some; the
    backward stop keeps one below the lowest active layer)."""
    backbone = model.base_model.model.bert
    modules = [backbone, backbone.embeddings] + list(backbone.encoder.layer)
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]


def assert_nothing_left(model, uncached):
    """``model`` holds the hooks ``uncached`` (the same fit without the cache) holds, and no patch."""
    backbone = model.base_model.model.bert
    assert hook_counts(model) == hook_counts(uncached)
    patched = [name for name, m in backbone.named_modules() if "forward" in m.__dict__]
    assert not patched, patched


@pytest.mark.parametrize("collate", [pad_fixed, pad_right], ids=["fixed-padding", "dynamic-padding"])
def test_a_cached_lightning_fit_with_fixed_top_k_trains_bitwise_and_skips_the_prefix(tmp_path, collate):
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    backbone = cached.base_model.model.bert
    counters = [CallCounter(backbone.embeddings.word_embeddings), CallCounter(backbone.encoder.layer[1].attention)]
    fit(tmp_path / "a", uncached, 4, collate=collate)
    finetuning, logged, epochs = fit(tmp_path / "b", cached, 4, prefix_cache=True, collate=collate,
                                     seen=lambda: [c.calls for c in counters])
    assert_same_lora(uncached, cached)
    hits = [m["layer_schedule/prefix_cache_hits"] for m, _ in epochs]
    misses = [m["layer_schedule/prefix_cache_misses"] for m, _ in epochs]
    assert all(m["layer_schedule/prefix_cache_boundary"] == 2.0 for m, _ in epochs)
    if collate is pad_fixed:
        # epoch 0 records every row; each later epoch is served from the cache, whatever the shuffle
        assert misses == [ROWS] * 4 and hits == [0, ROWS, 2 * ROWS, 3 * ROWS]
        assert [calls for _, calls in epochs] == [[5, 5]] * 4  # nothing below layer 2 ran after epoch 0
    else:
        # dynamic padding: a row hits at a padded length it was recorded at
        assert hits[-1] > hits[0] == 0 and misses[0] == ROWS
    # the callback logged the cache's metrics after every optimizer step, the last ones the run's totals
    assert len(logged) == 20 and logged[-1]["layer_schedule/prefix_cache_hits"] == hits[-1]
    assert logged[-1]["layer_schedule/prefix_cache_bytes"] > 0
    # the fit's end closed the cache: no hook or patch left, the whole model runs again
    assert finetuning.scheduler.prefix is None
    assert_nothing_left(cached, uncached)
    calls = counters[0].calls
    cached(**collate([VariableLength()[0]]))
    assert counters[0].calls == calls + 1


def test_milestones_moving_up_rebuild_the_cache_spill_to_dir_and_leave_no_file(tmp_path):
    schedule = {0: [1, 2, 3], 2: [2, 3]}
    uncached, cached = bert(schedule), bert(schedule)
    folder = tmp_path / "spill"
    fit(tmp_path / "a", uncached, 4)
    _, logged, epochs = fit(tmp_path / "b", cached, 4, prefix_cache=PrefixCache(max_bytes=10 * ROW_BYTES,
                                                                                 dir=str(folder)),
                            seen=lambda: len(list(folder.rglob("*"))))
    assert_same_lora(uncached, cached)
    assert [m["layer_schedule/prefix_cache_boundary"] for m, _ in epochs] == [1.0, 1.0, 2.0, 2.0]
    assert [m["layer_schedule/prefix_cache_misses"] for m, _ in epochs] == [ROWS, ROWS, 2 * ROWS, 2 * ROWS]
    assert [m["layer_schedule/prefix_cache_hits"] for m, _ in epochs] == [0, ROWS, ROWS, 2 * ROWS]
    assert all(m["layer_schedule/prefix_cache_disk_bytes"] > 0 for m, _ in epochs)
    assert all(files > 1 for _, files in epochs)  # its folder and the rows beyond the cap
    assert logged[-1]["layer_schedule/prefix_cache_disk_bytes"] > 0
    assert list(folder.rglob("*")) == []
    assert_nothing_left(cached, uncached)


class FailsInEpoch2(lt.ScheduledModule):
    def training_step(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("a failing step")
        return super().training_step(batch, batch_idx)


def test_a_fit_that_fails_closes_the_cache_too(tmp_path):
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    folder = tmp_path / "spill"
    with pytest.raises(RuntimeError, match="a failing step"):
        fit(tmp_path / "a", uncached, 4, module=FailsInEpoch2)
    with pytest.raises(RuntimeError, match="a failing step"):
        fit(tmp_path / "b", cached, 4, prefix_cache=PrefixCache(max_bytes=10 * ROW_BYTES, dir=str(folder)),
            module=FailsInEpoch2)
    assert list(folder.rglob("*")) == []
    assert_nothing_left(cached, uncached)
