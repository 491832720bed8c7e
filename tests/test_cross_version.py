"""Adapters move between the legacy stack (PEFT 0.3.0, Python 3.7) and the installed PEFT.

tox sets ``LEGACY_PYTHON`` to the interpreter of the PEFT 0.3.0 env (built earlier in the matrix); this
test runs ``helpers/xversion_worker.py`` there and here: legacy save -> load here and continue the schedule, and
save here (safetensors, PEFT's default) -> load on the legacy stack and continue.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from helpers import xversion_worker

LEGACY_PYTHON = os.environ.get("LEGACY_PYTHON", "")
TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = [
    pytest.mark.slow,  # another interpreter's processes
    pytest.mark.skipif(
        not (LEGACY_PYTHON and os.path.exists(LEGACY_PYTHON)),
        reason="LEGACY_PYTHON (the PEFT 0.3.0 env's interpreter) is not set or missing; tox sets it",
    ),
]


def _legacy(command, folder):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [LEGACY_PYTHON, "-m", "helpers.xversion_worker", command, str(folder)],
        cwd=TESTS,  # where `-m helpers...` is found
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _check_continued(result):
    assert result["tuner"] == "ScheduledLoraModel"
    assert result["max_abs_diff"] < 1e-5
    assert result["active"] == [1, 11]
    assert result["ever_active"] == [1, 11]
    assert result["changed_layers"] == ["1", "11"]


def test_legacy_adapter_loads_and_continues_here(tmp_path):
    saved = _legacy("save", tmp_path)
    assert "adapter_model.bin" in saved["saved"]
    _check_continued(xversion_worker.load(str(tmp_path)))


def test_adapter_saved_here_loads_and_continues_on_legacy(tmp_path):
    saved = xversion_worker.save(str(tmp_path))
    assert any(name.startswith("adapter_model.") for name in saved["saved"])
    result = _legacy("load", tmp_path)
    assert result["peft"] == "0.3.0"
    _check_continued(result)
