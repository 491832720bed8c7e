"""One rank of a 2-process DDP Trainer run with and without the prefix cache (gloo, CPU), launched by
tests/test_prefix_cache.py via torchrun. Each rank reads its own shard (the Trainer's sampler).

Writes OUT_DIR/ddp<rank>.json: the LoRA weights' hash of each run and the cached run's row hits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from test_prefix_cache import bert, trainer_run

from helpers.leave import leave_together
from helpers.scheduled_cases import lora_params
from helpers.toy_training import cpu_flag


def weights_hash(model):
    digest = hashlib.sha256()
    for name, param in sorted(lora_params(model).items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir):
    hashes, hits = {}, 0.0
    for cached in (False, True):
        model = bert({0: [2, 3]})
        metrics = trainer_run(model, os.path.join(out_dir, str(cached)), True if cached else None, "bert",
                              ddp_backend="gloo", ddp_find_unused_parameters=True, **cpu_flag())
        hashes[cached] = weights_hash(model)
        hits = metrics.get("layer_schedule/prefix_cache_hits", hits)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(os.path.join(out_dir, "ddp{}.json".format(rank)), "w") as handle:
        json.dump({"world": world, "uncached": hashes[False], "cached": hashes[True], "hits": hits}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
    leave_together()
