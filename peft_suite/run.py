"""PEFT's own LoRA tests, vanilla and with ``ScheduledLoraConfig``, side by side (the drop-in check).

    python peft_suite/run.py                 # every LoRA test of tests/test_custom_models.py
    python peft_suite/run.py --sample 9      # a deterministic 1-in-9 sample (what CI runs)

Takes the sdist of the installed PEFT from PyPI (cached under ``--cache``), runs the same selection of
its tests twice (``vanilla``: untouched; ``scheduled``: ``LoraConfig`` is ``ScheduledLoraConfig`` with no
schedule), and compares the outcome of every test.  A difference that is right by design is listed in
``known_differences.json`` (``{test id regex: reason}``) and runs as a strict xfail; any other difference,
or a listed one that no longer differs, fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KNOWN = os.path.join(HERE, "known_differences.json")


def peft_tests(version: str, cache: str) -> str:
    """The ``tests/`` folder of PEFT ``version``'s sdist, unpacked under ``cache`` (downloaded once)."""
    target = os.path.join(cache, "peft-%s" % version)
    if not os.path.isdir(os.path.join(target, "tests")):
        os.makedirs(cache, exist_ok=True)
        archive = os.path.join(cache, "peft-%s.tar.gz" % version)
        if not os.path.exists(archive):
            subprocess.check_call(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 "peft==%s" % version, "-d", cache]
            )
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/src/" not in m.name]  # the tests and PEFT's pytest config
            tar.extractall(cache, members=members)
    # PEFT's test modules import each other relatively (from .testing_common import ...).
    open(os.path.join(target, "tests", "__init__.py"), "a").close()
    return target


def run_mode(mode: str, peft_dir: str, files: List[str], sample: int, extra: List[str]) -> Dict[str, str]:
    handle, out = tempfile.mkstemp(prefix="peft_suite_%s_" % mode, suffix=".json")
    os.close(handle)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [
        sys.executable, "-m", "pytest", "-p", "peft_suite.plugin", "-p", "no:cacheprovider",
        "-o", "addopts=", "-q", "--no-header", "-rN",
        "--peft-suite-mode", mode, "--peft-suite-sample", str(sample), "--peft-suite-outcomes", out,
        "--peft-suite-xfail", KNOWN,
    ] + files + extra
    print("[peft-suite] %s: %s" % (mode, " ".join(command[3:])), flush=True)
    subprocess.call(command, cwd=peft_dir, env=env)
    with open(out) as handle_in:
        outcomes = json.load(handle_in)
    os.unlink(out)
    return outcomes


def main(argv: List[str] = None) -> int:
    import peft

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, default=1, help="run 1 test in N (deterministic); default: all")
    default_cache = os.path.join(os.path.expanduser("~"), ".cache", "peft-layersched", "peft-sdist")
    parser.add_argument("--cache", default=default_cache, help="where the sdist is kept (default: %(default)s)")
    parser.add_argument("--files", nargs="+", default=["tests/test_custom_models.py"])
    parser.add_argument("--mode", choices=("both", "scheduled", "vanilla"), default="both")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    peft_dir = peft_tests(peft.__version__, args.cache)
    modes = ["vanilla", "scheduled"] if args.mode == "both" else [args.mode]
    results = {mode: run_mode(mode, peft_dir, args.files, args.sample, args.pytest_args) for mode in modes}
    for mode in modes:
        counts = collections.Counter(v for k, v in results[mode].items() if not k.endswith(" :: error"))
        print("[peft-suite] PEFT %s, %s: %s" % (peft.__version__, mode, ", ".join(
            "%d %s" % (counts[kind], kind) for kind in ("passed", "failed", "skipped", "xfailed", "xpassed")
            if counts[kind])))
    if args.mode != "both":
        return 0
    vanilla, scheduled = results["vanilla"], results["scheduled"]
    tests = sorted(k for k in set(vanilla) | set(scheduled) if not k.endswith(" :: error"))
    bad = []
    expected = 0
    for test in tests:
        ours, theirs = scheduled.get(test, "missing"), vanilla.get(test, "missing")
        if ours == "xfailed" and theirs == "passed":
            expected += 1
        elif ours != theirs:
            bad.append((test, theirs, ours, scheduled.get(test + " :: error", "")))
    same = len(tests) - expected - len(bad)
    print("[peft-suite] %d tests: %d same outcome, %d known differences (%s), %d unexpected"
          % (len(tests), same, expected, os.path.basename(KNOWN), len(bad)))
    for test, theirs, ours, error in bad:
        print("  %s: vanilla %s, scheduled %s %s" % (test, theirs, ours, error.splitlines()[0] if error else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
