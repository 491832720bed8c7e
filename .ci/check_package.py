"""Release checks: what `pip install peft-layersched` and the sdist give a user.

    tox -e package                          (part of the matrix: .ci/run runs it with the other envs)
    python .ci/check_package.py [--keep DIR] [--skip-fresh]

Needs `build` and `twine` in the running Python (tox env `package` pins them), and python3.7 / python3.13
(on PATH, or PYTHON37 / PYTHON313).  Steps, each reported; the exit status is 1 if any check failed:

1. `python -m build` from a copy of the checkout: the sdist, then the wheel built from that sdist (so
   the sdist is complete enough to build); `twine check --strict` on both (README renders on PyPI).
2. Contents: the wheel holds every module of peft_layersched/ plus py.typed and nothing else at the top;
   the sdist holds every file of the checkout (git's list: tests, examples, docs, CHANGELOG, ...).
3. One version everywhere: peft_layersched/__init__.py's __version__ (the only source), the wheel's and
   the sdist's metadata, both file names, and the newest release heading of CHANGELOG.md.
4. Fresh virtual envs, made anew on each run, on Python 3.7 and 3.13: the wheel installed with the
   dependency pins of tox envs py37-peft030 / py313 as constraints (the releases the matrix already
   downloads), then imported from the env's site-packages (version, py.typed), and
   `peft-layersched --help` run.  On 3.7 the sdist is also built into a wheel, with the newest
   setuptools that 3.7 gets (a source install there).
"""

import argparse
import ast
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "peft_layersched"
DIST_NAME = "peft-layersched"
# the runtime stack whose pins the fresh envs take from tox.ini (test tools and extras are left out)
STACK = ("torch", "transformers", "accelerate", "peft", "huggingface-hub", "tokenizers", "safetensors", "numpy")
# Python version -> tox env whose pins the fresh env uses
FRESH = (("3.7", "py37-peft030"), ("3.13", "py313"))
# built and tracked, but not wanted in the sdist
NOT_IN_SDIST = (".gitignore",)

failures = []
timings = []


def log(message):
    print("[check_package] " + message, flush=True)


def check(ok, what, detail=""):
    log(("ok    " if ok else "FAIL  ") + what + ("" if ok or not detail else ": " + detail))
    if not ok:
        failures.append(what + (": " + detail if detail else ""))
    return ok


def run(cmd, what, cwd=None, env=None):
    """Run cmd; record its time; a failure is recorded with the tail of its output.  Returns stdout or None."""
    start = time.monotonic()
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True,
    )
    timings.append((what, time.monotonic() - start))
    if not check(done.returncode == 0, what, "exit %d\n%s" % (done.returncode, done.stdout[-4000:])):
        return None
    return done.stdout


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def source_files():
    """The checkout's files, relative to ROOT: git's list (tracked + untracked not ignored) when it has one."""
    if os.path.isdir(os.path.join(ROOT, ".git")) or os.path.isfile(os.path.join(ROOT, ".git")):
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
            stdout=subprocess.PIPE, check=True,
        ).stdout.decode()
        return sorted(f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f)))
    skip = {".git", ".tox", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis"}
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if not f.endswith(".pyc")]
    return sorted(found)


def source_version(path):
    """__version__ of peft_layersched/__init__.py, read as a literal (how setuptools reads it too)."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def changelog_release(path):
    """(the newest release heading's version, whether "## [Unreleased]" comes before it, link refs)."""
    with open(path) as handle:
        text = handle.read()
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?\s*$", text, re.M)
    releases = [(v, d) for v, d in headings if v != "Unreleased"]
    unreleased_first = bool(headings) and headings[0][0] == "Unreleased"
    links = dict(re.findall(r"^\[([^\]]+)\]: (\S+)\s*$", text, re.M))
    return releases, unreleased_first, links


def metadata_fields(text):
    """Header fields (name -> list of values) and the body of a METADATA / PKG-INFO file."""
    head, _, body = text.partition("\n\n")
    fields = {}
    for line in head.splitlines():
        if ":" in line and not line.startswith((" ", "\t")):
            key, _, value = line.partition(":")
            fields.setdefault(key, []).append(value.strip())
    return fields, body


def tox_pins(section):
    """The STACK pins (name -> version) of a tox env's deps, following {[section]deps} references."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "tox.ini"))

    def lines(name):
        for line in parser.get(name, "deps").splitlines():
            line = line.split("#", 1)[0].strip()
            ref = re.fullmatch(r"\{\[([^\]]+)\]deps\}", line)
            if ref:
                yield from lines(ref.group(1))
            elif line:
                yield line

    pins = {}
    for line in lines("testenv:" + section):
        name, _, version = line.partition("==")
        if normalize(name) in STACK and version:
            pins[normalize(name)] = version.strip()
    return pins


def find_python(version):
    override = os.environ.get("PYTHON" + version.replace(".", ""))
    for cand in (override, shutil.which("python" + version)):
        if not cand:
            continue
        done = subprocess.run(
            [cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2]); print(sys.executable)"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True,
        )
        out = done.stdout.split()
        if done.returncode == 0 and out and out[0] == version:
            return out[1]
    return None


def build(work, files):
    src = os.path.join(work, "src")
    for name in files:
        os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(src, name))
    dist = os.path.join(work, "dist")
    out = run([sys.executable, "-m", "build", "--outdir", dist, src], "python -m build (sdist, wheel from the sdist)")
    if out is None:
        return None, None
    warned = sorted({line.strip() for line in out.splitlines() if re.search(r"Warning|WARNING", line)})
    for line in warned:
        log("      build says: " + line)
    wheels = [f for f in os.listdir(dist) if f.endswith(".whl")]
    sdists = [f for f in os.listdir(dist) if f.endswith(".tar.gz")]
    if not check(len(wheels) == 1 and len(sdists) == 1, "one wheel and one sdist built", str(os.listdir(dist))):
        return None, None
    wheel, sdist = os.path.join(dist, wheels[0]), os.path.join(dist, sdists[0])
    run([sys.executable, "-m", "twine", "check", "--strict", wheel, sdist], "twine check --strict")
    return wheel, sdist


def check_wheel(wheel, version, readme, modules):
    name = os.path.basename(wheel)
    check(name == "%s-%s-py3-none-any.whl" % (PACKAGE, version), "wheel file name", name)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = "%s-%s.dist-info" % (PACKAGE, version)
        fields, body = metadata_fields(archive.read(info + "/METADATA").decode())
        entry_points = archive.read(info + "/entry_points.txt").decode() if info + "/entry_points.txt" in names else ""
    top = sorted({n.split("/", 1)[0] for n in names})
    check(top == sorted([PACKAGE, info]), "wheel holds only %s/ and its dist-info" % PACKAGE, str(top))
    wanted = sorted(modules + [PACKAGE + "/py.typed"])
    have = sorted(n for n in names if n.startswith(PACKAGE + "/"))
    check(have == wanted, "wheel holds every module and py.typed",
          "missing %s, extra %s" % (sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))))
    check(fields.get("Version") == [version], "wheel METADATA Version == __version__", str(fields.get("Version")))
    check(fields.get("Name") == [DIST_NAME], "wheel METADATA Name", str(fields.get("Name")))
    check(fields.get("Requires-Python") == [">=3.7"], "wheel Requires-Python", str(fields.get("Requires-Python")))
    check(fields.get("Description-Content-Type") == ["text/markdown"], "long description is Markdown",
          str(fields.get("Description-Content-Type")))
    check(body.strip() == readme.strip(), "long description is README.md", "the METADATA body differs")
    check(re.search(r"^peft-layersched = peft_layersched\.cli:main$", entry_points, re.M) is not None,
          "console script peft-layersched", entry_points)


def check_sdist(sdist, version, files):
    name = os.path.basename(sdist)
    check(name == "%s-%s.tar.gz" % (PACKAGE, version), "sdist file name", name)
    prefix = "%s-%s/" % (PACKAGE, version)
    with tarfile.open(sdist) as archive:
        members = archive.getnames()
        fields, _ = metadata_fields(archive.extractfile(prefix + "PKG-INFO").read().decode())
    have = {m[len(prefix):] for m in members if m.startswith(prefix)}
    wanted = [f for f in files if f not in NOT_IN_SDIST]
    missing = [f for f in wanted if f not in have]
    check(not missing, "sdist holds every file of the checkout (%d)" % len(wanted), "missing %s" % missing)
    for must in ("README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", PACKAGE + "/py.typed", "tests/conftest.py"):
        check(must in have, "sdist holds " + must)
    check(fields.get("Version") == [version], "sdist PKG-INFO Version == __version__", str(fields.get("Version")))


# Runs inside each fresh env (python -I: no PYTHONPATH, no cwd on sys.path).
PROBE = r"""
import json, os, sys
import peft_layersched, peft_layersched.cli
try:
    from importlib.metadata import version
except ImportError:  # Python 3.7
    from importlib_metadata import version
here = os.path.dirname(peft_layersched.__file__)
print(json.dumps({"version": peft_layersched.__version__, "dist_version": version("peft-layersched"),
                  "file": os.path.realpath(here), "prefix": os.path.realpath(sys.prefix),
                  "py_typed": os.path.isfile(os.path.join(here, "py.typed")),
                  "python": "%d.%d" % sys.version_info[:2]}))
"""


def fresh_env(work, python_version, section, wheel, sdist, version):
    label = "Python %s" % python_version
    python = find_python(python_version)
    if not check(python is not None, "%s found" % label,
                 "no python%s on PATH (or set PYTHON%s)" % (python_version, python_version.replace(".", ""))):
        return
    pins = tox_pins(section)
    if not check(sorted(pins) == sorted(STACK), "%s: tox env %s pins the whole stack" % (label, section), str(pins)):
        return
    env_dir = os.path.join(work, "venv" + python_version)
    constraints = os.path.join(work, "constraints-%s.txt" % python_version)
    with open(constraints, "w") as handle:
        handle.write("".join("%s==%s\n" % item for item in sorted(pins.items())))
    # no PYTHONPATH / PYTHONHOME from the caller (tox sets neither; a developer's shell might)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_PROGRESS_BAR="off")
    start = time.monotonic()
    if run([python, "-m", "venv", env_dir], "%s: fresh venv" % label, env=env) is None:
        return
    bin_dir = os.path.join(env_dir, "bin")
    py = os.path.join(bin_dir, "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    if python_version == "3.7":
        # the sdist builds on 3.7 too (pip picks the newest setuptools that supports it)
        built = os.path.join(work, "wheel37")
        if run(pip + ["wheel", "--no-deps", "-q", "-w", built, sdist], "%s: sdist builds a wheel" % label, env=env):
            names = os.listdir(built)
            check(names == [os.path.basename(wheel)], "%s: same wheel name as the main build" % label, str(names))
            if names:
                with zipfile.ZipFile(os.path.join(built, names[0])) as a, zipfile.ZipFile(wheel) as b:
                    check(sorted(a.namelist()) == sorted(b.namelist()), "%s: same wheel contents" % label)
    if run(pip + ["install", "-q", "--no-compile", "-c", constraints, wheel], "%s: pip install the wheel" % label,
           env=env) is None:
        return
    out = run([py, "-I", "-c", PROBE], "%s: import peft_layersched" % label, cwd=work, env=env)
    if out is not None:
        probe = json.loads(out.strip().splitlines()[-1])
        check(probe["python"] == python_version, "%s: env runs that Python" % label, probe["python"])
        check(probe["file"].startswith(probe["prefix"]), "%s: imported from the env's site-packages" % label,
              probe["file"])
        check(probe["version"] == version and probe["dist_version"] == version,
              "%s: installed version == %s" % (label, version), str(probe))
        check(probe["py_typed"], "%s: py.typed installed" % label)
    cli = os.path.join(bin_dir, "peft-layersched")
    out = run([cli, "--help"], "%s: peft-layersched --help" % label, cwd=work, env=env)
    if out is not None:
        check(all(word in out for word in ("plan", "inspect", "demo")), "%s: --help lists the subcommands" % label,
              out)
    timings.append(("%s: fresh env, all steps" % label, time.monotonic() - start))
    shutil.rmtree(env_dir, ignore_errors=True)  # several GB (torch): not kept even with --keep


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", metavar="DIR", help="build in DIR and keep the sdist and wheel there")
    parser.add_argument("--skip-fresh", action="store_true", help="no fresh-env installs (steps 1-3 only)")
    args = parser.parse_args(argv)
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="peft-layersched-package-")
    os.makedirs(work, exist_ok=True)
    start = time.monotonic()
    try:
        files = source_files()
        version = source_version(os.path.join(ROOT, PACKAGE, "__init__.py"))
        check(bool(version), "__version__ in %s/__init__.py" % PACKAGE)
        releases, unreleased_first, links = changelog_release(os.path.join(ROOT, "CHANGELOG.md"))
        check(unreleased_first, 'CHANGELOG.md starts with "## [Unreleased]"')
        check(bool(releases) and releases[0][0] == version and bool(releases[0][1]),
              "CHANGELOG.md's newest release is [%s] - <date>" % version, str(releases[:1]))
        if links:  # Keep a Changelog's link references: one per heading, when the file has them
            missing = [v for v in ["Unreleased"] + [r for r, _ in releases] if v not in links]
            check(not missing, "CHANGELOG.md link references", "missing %s" % missing)
        with open(os.path.join(ROOT, "README.md")) as handle:
            readme = handle.read()
        modules = [f for f in files if f.startswith(PACKAGE + "/") and f.endswith(".py")]
        wheel, sdist = build(work, files)
        if wheel:
            check_wheel(wheel, version, readme, modules)
            check_sdist(sdist, version, files)
            if not args.skip_fresh:
                for python_version, section in FRESH:
                    fresh_env(work, python_version, section, wheel, sdist, version)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    timings.append(("total", time.monotonic() - start))
    print("\ntimes:")
    for what, seconds in timings:
        print("  %7.1f s  %s" % (seconds, what))
    if failures:
        print("\n%d packaging check(s) failed:" % len(failures))
        for failure in failures:
            print("  - " + failure.splitlines()[0])
        return 1
    print("\nall packaging checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
