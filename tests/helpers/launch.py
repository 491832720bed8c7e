"""Run a worker or an example script of this package in other processes: 2 torchrun ranks, or another env's
interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_ranks(worker, out, kinds, timeout):
    """``torchrun --nproc_per_node 2 -m helpers.<worker> OUT KIND,...`` (gloo, CPU); fails the test with
    the tail of the output if it does not exit 0 within ``timeout`` seconds."""
    torchrun(["-m", f"helpers.{worker}", str(out), ",".join(kinds)], f"{worker} run of {kinds}", timeout)
    return out


def torchrun(args, what, timeout):
    """``torchrun --standalone --nproc_per_node 2 ARGS`` in tests/; fails the test (naming ``what``) with the
    tail of the output if it does not exit 0 within ``timeout`` seconds.  Returns the output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + list(args)
    # cwd: tests/, where `-m helpers.<worker>` is found (`python -m` puts the working directory on sys.path).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=TESTS, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"), universal_newlines=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both ranks
        process.communicate()
        pytest.fail(f"the 2-process {what} did not finish within {timeout} s")
    assert process.returncode == 0, output[-6000:]
    return output
