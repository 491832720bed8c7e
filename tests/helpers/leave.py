"""How a torchrun rank of the test suite ends: together with the other rank, without interpreter teardown."""

from __future__ import annotations

import os
import sys


def leave_together(code=0):
    """Wait for every rank, then exit at once. Interpreter teardown with gloo's threads still alive can
    abort a rank ("terminate called without an active exception"), and destroy_process_group can hang
    (pytorch/pytorch#75097): the results are written by now, so neither is run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
