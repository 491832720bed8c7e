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


def descendants(pid):
    """The pids of ``pid``'s children, their children and so on (Linux: read from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(os.path.join("/proc", entry, "stat")) as handle:
                    stat = handle.read()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, ppid in parent.items() if ppid in frontier]
        found.extend(children)
        frontier = children
    return found


def torchrun(args, what, timeout):
    """``torchrun --standalone --nproc_per_node 2 ARGS`` in tests/; fails the test (naming ``what``) with the
    tail of the output if it does not exit 0 within ``timeout`` seconds.  Returns the output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + list(args)
    # cwd: tests/, where `-m helpers.<worker>` is found (`python -m` puts the working directory on sys.path).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=TESTS, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"), universal_newlines=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Where did it hang? SIGABRT makes each Python process print every thread's stack (faulthandler)
        # into the output the failure shows.
        for pid in descendants(process.pid):
            try:
                os.kill(pid, signal.SIGABRT)
            except OSError:
                pass
        try:
            output, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # torchrun's ranks may sit in process groups of their own: kill every descendant, not only the group,
        # or a rank left alive keeps the output pipe open and communicate() never returns.
        for pid in [process.pid] + descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if process.returncode is None:
            try:
                output, _ = process.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                output = ""
        pytest.fail(f"the 2-process {what} did not finish within {timeout} s; its output:\n{(output or '')[-6000:]}")
    assert process.returncode == 0, output[-6000:]
    return output
