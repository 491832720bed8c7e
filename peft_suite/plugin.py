"""pytest plugin: PEFT's own LoRA tests with ``ScheduledLoraConfig`` in place of ``LoraConfig``.

Loaded by ``peft_suite/run.py`` into a pytest run over the ``tests/`` folder of PEFT's sdist:

    pytest -p peft_suite.plugin --peft-suite-mode scheduled tests/test_custom_models.py

``--peft-suite-mode scheduled`` binds ``peft.LoraConfig`` to ``ScheduledLoraConfig`` before PEFT's test
modules are imported, so every ``LoraConfig`` they name (case tables, test bodies, the common tester's
``config_cls == LoraConfig`` branches) is ours, with no schedule.  ``vanilla`` runs the same selection
untouched, for the side-by-side count.  Either way only the LoRA tests are kept: a test whose parameters
(``pytest.mark.parametrize``, or ``parameterized.expand`` as in PEFT <= 0.15) hold the LoRA config class
(or an instance), or whose body names ``LoraConfig``.
``--peft-suite-sample N`` keeps a deterministic 1-in-N sample (by SHA-256 of the test id), and
``--peft-suite-outcomes FILE`` writes ``{test id: outcome}`` as JSON for the comparison.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from typing import Any, Dict, List

import pytest

_NAMES_LORA_CONFIG = re.compile(r"(?<![A-Za-z0-9_])LoraConfig\b")


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("peft-suite")
    group.addoption("--peft-suite-mode", choices=("scheduled", "vanilla"), default="scheduled")
    group.addoption("--peft-suite-sample", type=int, default=1, help="keep 1 test in N (deterministic)")
    group.addoption("--peft-suite-outcomes", default=None, help="write {test id: outcome} JSON here")
    group.addoption("--peft-suite-xfail", default=None, help="JSON {test id pattern: reason} of known differences")


def pytest_configure(config: Any) -> None:
    import peft

    config._peft_suite_lora = peft.LoraConfig  # the class the selection looks for
    config._peft_suite_outcomes = {}
    if config.getoption("--peft-suite-mode") == "scheduled":
        from peft_layersched import ScheduledLoraConfig

        peft.LoraConfig = ScheduledLoraConfig
        config._peft_suite_lora = ScheduledLoraConfig


def _holds(value: Any, cls: type, depth: int = 0, exact: bool = False) -> bool:
    """Whether ``value`` (or a list/dict in it) is ``cls`` or an instance of it; with ``exact``, of ``cls``
    itself and not a subclass (``AdaLoraConfig`` subclasses ``LoraConfig``, not ``ScheduledLoraConfig``: an
    AdaLoRA test must count as LoRA in neither mode, or the two modes would select different tests)."""
    if value is cls or (type(value) is cls if exact else isinstance(value, cls)):
        return True
    if depth > 3:
        return False
    if isinstance(value, (list, tuple, set)):
        return any(_holds(item, cls, depth + 1, exact) for item in value)
    if isinstance(value, dict):
        return any(_holds(item, cls, depth + 1, exact) for item in value.values())
    return False


def _params(item: Any) -> Any:
    """The values a test runs with, or ``None`` for a test without parameters: pytest's parametrize (the
    callspec; PEFT >= 0.16) or ``parameterized.expand`` (PEFT <= 0.15: each generated method closes over a
    ``param`` holding its case's arguments, and has no callspec)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        return list(callspec.params.values())
    for cell in getattr(getattr(item, "function", None), "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if type(value).__name__ == "param" and hasattr(value, "args") and hasattr(value, "kwargs"):
            return list(value.args) + list(value.kwargs.values())
    return None


def _is_lora_test(item: Any, cls: type) -> bool:
    params = _params(item)
    if params is not None and any(_holds(value, cls, exact=True) for value in params):
        return True
    function = getattr(item, "function", None)
    if function is None:
        return False
    try:
        # parameterized.expand's generated method: the source is the decorated method's (place_as)
        source = inspect.getsource(getattr(function, "place_as", function))
    except (OSError, TypeError):
        return False
    # parametrized tests whose parameters hold no LoRA config are other methods' tests
    if params is not None and any(_holds_config(value) for value in params):
        return False
    return bool(_NAMES_LORA_CONFIG.search(source))


def _holds_config(value: Any) -> bool:
    from peft import PeftConfig

    return _holds(value, PeftConfig) or (isinstance(value, type) and issubclass(value, PeftConfig))


def test_key(nodeid: str) -> str:
    """The test's id with the config class spelled as in PEFT, the same in both modes."""
    return nodeid.replace("ScheduledLoraConfig", "LoraConfig")


def _sampled(nodeid: str, every: int) -> bool:
    if every <= 1:
        return True
    return int(hashlib.sha256(test_key(nodeid).encode("utf-8")).hexdigest()[:8], 16) % every == 0


def pytest_collection_modifyitems(session: Any, config: Any, items: List[Any]) -> None:
    cls = config._peft_suite_lora
    every = config.getoption("--peft-suite-sample")
    keep, drop = [], []
    for item in items:
        (keep if _is_lora_test(item, cls) and _sampled(item.nodeid, every) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    xfail_file = config.getoption("--peft-suite-xfail")
    if xfail_file and config.getoption("--peft-suite-mode") == "scheduled":
        with open(xfail_file) as handle:
            known: Dict[str, str] = json.load(handle)
        for item in items:
            for pattern, reason in known.items():
                if re.search(pattern, test_key(item.nodeid)):
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
                    break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    outcome = yield
    report = outcome.get_result()
    outcomes = item.config._peft_suite_outcomes
    key = test_key(item.nodeid)
    if report.when == "setup" and report.outcome != "passed":
        outcomes[key] = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    elif report.when == "call":
        if hasattr(report, "wasxfail"):
            outcomes[key] = "xpassed" if report.outcome == "passed" else "xfailed"
        else:
            outcomes[key] = report.outcome
            if report.outcome == "failed":
                outcomes[key + " :: error"] = str(call.excinfo.value)[:300] if call.excinfo else ""


def pytest_sessionfinish(session: Any, exitstatus: Any) -> None:
    path = session.config.getoption("--peft-suite-outcomes")
    if path:
        with open(path, "w") as handle:
            json.dump(session.config._peft_suite_outcomes, handle, indent=1, sort_keys=True)
