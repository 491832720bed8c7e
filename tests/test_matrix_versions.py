"""The tox matrix declares, per env, which versions it must run on (EXPECT_* variables in tox.ini).

These tests compare them with what is really importable, so an env whose pins drifted (a resolver
upgrade, a wrong torch build, a typo in tox.ini) fails instead of silently testing something else.
Outside tox the variables are unset and the tests skip.
"""

import importlib
import os
import sys

import pytest
from packaging.version import Version

# EXPECT_* variable -> importable module whose __version__ it pins
MODULES = {
    "EXPECT_TORCH": "torch",
    "EXPECT_TRANSFORMERS": "transformers",
    "EXPECT_ACCELERATE": "accelerate",
    "EXPECT_PEFT": "peft",
    "EXPECT_LIGHTNING": "lightning",  # the lightning env only
    "EXPECT_AXOLOTL": "axolotl",  # the axolotl env only
}
# an env that declares any of these must declare all of them
REQUIRED = ("EXPECT_PYTHON", "EXPECT_TORCH", "EXPECT_TRANSFORMERS", "EXPECT_PEFT")


def _declared():
    return [name for name in REQUIRED if os.environ.get(name)]


def test_matrix_declaration_is_complete():
    declared = _declared()
    if not declared:
        pytest.skip("no EXPECT_* variables set: not running inside a tox matrix env")
    missing = [name for name in REQUIRED if name not in declared]
    assert not missing, f"tox env declares {declared} but not {missing}"


@pytest.mark.parametrize("var", sorted(MODULES))
def test_installed_version_matches_matrix(var):
    expected = os.environ.get(var)
    if not expected:
        pytest.skip(f"{var} not set: not running inside a tox matrix env")
    module = importlib.import_module(MODULES[var])
    actual = Version(module.__version__)
    wanted = Version(expected)
    # torch reports its build as a local version ("1.13.1+cu117", "2.13.0+cpu"): compare the release
    # unless the matrix pins a local version itself.
    if not wanted.local:
        actual = Version(actual.public)
    assert actual == wanted, (
        f"{var}: installed {MODULES[var]} {module.__version__}, tox env expects {expected}"
    )


def test_python_version_matches_matrix():
    expected = os.environ.get("EXPECT_PYTHON")
    if not expected:
        pytest.skip("EXPECT_PYTHON not set: not running inside a tox matrix env")
    actual = "{}.{}".format(*sys.version_info[:2])
    assert actual == expected, f"running on Python {actual}, tox env expects {expected}"


def test_package_under_test_is_the_installed_wheel():
    """Inside tox the tests must import the built wheel, not the source tree next to them."""
    if os.environ.get("EXPECT_PACKAGE_INSTALLED") != "1":
        pytest.skip("EXPECT_PACKAGE_INSTALLED not set: not running inside a tox matrix env")
    import peft_layersched

    location = os.path.realpath(os.path.dirname(peft_layersched.__file__))
    checkout = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir, "peft_layersched"))
    assert location != checkout, (
        f"peft_layersched was imported from the checkout ({location}), not from the env's site-packages; "
        "something put the repository root on sys.path"
    )
    assert os.path.realpath(sys.prefix) in location, (
        f"peft_layersched imported from outside the env: {location}"
    )
