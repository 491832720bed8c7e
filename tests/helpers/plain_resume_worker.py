"""One rank of the 2-process plain-loop resume check (gloo, CPU), launched by tests/test_resume_orders.py:

    cd tests && python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m helpers.plain_resume_worker OUT_DIR fixed,grad_norm,update,outlier,weight_norm

For each kind writes OUT_DIR/<kind><rank>.json: the world size, what each resume order found different from
the uninterrupted run (helpers.plain_resume.check), the final weights' hash and a digest of the rank's data.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from helpers import plain_resume


def main(out_dir, kinds):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        checkpoints = os.path.join(out_dir, "checkpoints")
        os.makedirs(checkpoints, exist_ok=True)
        for kind in kinds:
            results, digest = plain_resume.check(kind, checkpoints)
            data = plain_resume.batch(0)["input_ids"].sum().item()
            with open(os.path.join(out_dir, f"{kind}{rank}.json"), "w") as handle:
                json.dump({"world": dist.get_world_size(), "results": results, "hash": digest, "data": data}, handle)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
