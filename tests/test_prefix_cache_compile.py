"""The frozen-prefix cache under ``torch.compile``: a compiled, shuffled, multi-epoch plain loop trains
bitwise as the same compiled loop without the cache, and served batches run nothing below the boundary.

The backend is ``aot_eager``, as in tests/test_compile.py: dynamo's capture and AOTAutograd's joint
graph, run by eager kernels. The cache's hooks run uncompiled (they hash row keys in Python): no
recompile as the cache fills.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import DataLoader

from peft_layersched import LayerScheduler

from helpers.scheduled_cases import lora_params

if os.environ.get("TOX_ENV_NAME") and os.environ.get("PEFT_LAYERSCHED_COMPILE_TESTS") != "1":
    # dynamo tracing: tox.ini runs the compile tests in the envs that set PEFT_LAYERSCHED_COMPILE_TESTS=1
    pytest.skip("compile tests run in the tox envs that set PEFT_LAYERSCHED_COMPILE_TESTS=1", allow_module_level=True)
if not hasattr(torch, "compile"):
    pytest.skip("torch.compile needs torch >= 2.0 (this is {})".format(torch.__version__), allow_module_level=True)

from test_prefix_cache import VariableLength, assert_same_lora, bert, pad_fixed, pad_right  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

pytestmark = pytest.mark.slow  # torch.compile's tracing

BACKEND = "aot_eager"
EPOCHS = 3
ROWS = 24  # VariableLength(): 5 batches of 5 (the last one 4) per epoch


class Calls(object):
    """Counts a module's forward calls; the hook runs uncompiled (traced, a count is not reliable)."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(torch.compiler.disable(self._count))

    def _count(self, module, args, output):
        self.count += 1


def compiled_run(model, collate, prefix_cache=None, on_epoch=None, data=None):
    """A compiled, shuffled plain loop over ``data`` (VariableLength()); returns the cache's hits."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    loader = DataLoader(data or VariableLength(), batch_size=5, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(LayerScheduler.param_groups(model), lr=1e-2)
    sched = LayerScheduler(model, optimizer, total_epochs=EPOCHS, prefix_cache=prefix_cache)
    compiled = torch.compile(model, backend=BACKEND)
    model.train()
    # The cache's hooks run uncompiled: traced, their lookups guarded on the cache's size and each
    # recorded batch recompiled the backbone until dynamo gave up compiling it.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(EPOCHS):
            for batch in loader:
                compiled(**batch).loss.backward()
                optimizer.step()
                sched.step()
                optimizer.zero_grad(set_to_none=True)
            if on_epoch is not None:
                on_epoch(sched)
            sched.epoch_end()
    hits = sched.prefix.hits if sched.prefix is not None else 0
    sched.finish()
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    return hits


@pytest.mark.parametrize("collate", [pad_fixed, pad_right], ids=["fixed-padding", "dynamic-padding"])
def test_a_compiled_loop_with_the_cache_trains_bitwise_as_without_it_and_skips_the_prefix(collate):
    uncached, cached = bert({0: [2, 3]}), bert({0: [2, 3]})
    compiled_run(uncached, collate)
    backbone = cached.base_model.model.bert
    # (The embeddings' own child: it runs whenever the embeddings do. A hook on a module inside a layer
    # counted too few calls here once the cache's hooks broke the graph; not used.)
    calls = Calls(backbone.embeddings.word_embeddings)
    seen = []
    compiled_run(cached, collate, prefix_cache=True, on_epoch=lambda sched: seen.append(
        (sched.prefix.hits, sched.prefix.misses, calls.count)))
    assert_same_lora(uncached, cached)
    assert any(not torch.equal(p, q) for p, q in zip(lora_params(cached).values(),
                                                    lora_params(bert({0: [2, 3]})).values()))
    if collate is pad_fixed:
        # epoch 0 records every row; the later epochs are served whole: the prefix ran in epoch 0 only
        assert seen == [(0, ROWS, 5), (ROWS, ROWS, 5), (2 * ROWS, ROWS, 5)], seen
    else:
        # dynamic padding: rows hit at a padded length they were recorded at; a batch of hits only skips
        hits, misses, prefix_calls = seen[-1]
        assert hits > 0 and EPOCHS * 5 - prefix_calls >= 1, seen
    assert "forward" not in backbone.embeddings.__dict__  # closed after the run



def test_a_compiled_t5_loop_with_the_encoder_cache_trains_bitwise_as_without_it():
    from test_prefix_cache_encoder import Pairs, t5
    from test_prefix_cache_encoder import pad_fixed as pad_pairs

    uncached, cached = t5(), t5()
    compiled_run(uncached, pad_pairs, data=Pairs())
    hits = compiled_run(cached, pad_pairs, prefix_cache=True, data=Pairs())
    assert_same_lora(uncached, cached)
    assert hits == (EPOCHS - 1) * ROWS
    assert "forward" not in cached.base_model.model.encoder.__dict__  # closed after the run
