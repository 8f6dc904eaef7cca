"""Gradescope's autograder.zip for one assignment: setup.sh, run_autograder and a minina wheel of this checkout.

The wheel pins the grading code for the term: a later minina release cannot change a grade. run_autograder grades
$AUTOGRADER_ROOT/submission (default /autograder) as the assignment, with the seed and limits given here, and
writes $AUTOGRADER_ROOT/results/results.json; the variable lets it run in any tree laid out like Gradescope's.
"""
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .exercises import ASSIGNMENTS

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, in /autograder/source, when it builds the autograder image.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v pip3 >/dev/null; then
    apt-get update && apt-get install -y python3 python3-pip
fi
# bubblewrap: the notebooks' sandbox (where it cannot start, run_autograder grades without it)
command -v bwrap >/dev/null || (apt-get update && apt-get install -y bubblewrap) || true
# CPU wheels of torch (the checks need no GPU); the bundled minina wheel is the grading code of this term.
pip3 install --extra-index-url https://download.pytorch.org/whl/cpu ./{wheel} nbformat nbclient ipykernel
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission. AUTOGRADER_ROOT (default /autograder) holds source/, submission/ and
# results/. The notebook runs in minina's sandbox (bubblewrap, installed by setup.sh) where it starts; where
# Gradescope's container blocks it (no user namespaces), --unsafe grades without it: Gradescope's own container,
# discarded after this one submission, still keeps submissions apart, but not the notebook from this grader.
set -uo pipefail
ROOT="${{AUTOGRADER_ROOT:-/autograder}}"
chmod -R go-rwx "$ROOT/source" 2>/dev/null || true  # the private checks are the grader's alone
mkdir -p "$ROOT/results"
python3 -m minina assignments grade "$ROOT/submission" --assignment {assignment} --seed {seed} --timeout {timeout} \\
    --notebook-timeout {notebook_timeout} --memory {memory} --format gradescope --visibility {visibility} \\
    --unsafe --out "$ROOT/results/results.json"{extra}
"""


def checkout_root():
    """The source checkout this minina runs from (it holds pyproject.toml), for building the wheel."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"the autograder bundles a wheel built from a minina checkout; {root} has no "
                                f"pyproject.toml (run it from a clone: pip install -e .)")
    return root


def build_wheel(folder):
    """Build minina's wheel from a copy of the checkout (which stays clean) into folder; returns its path."""
    root = checkout_root()
    with tempfile.TemporaryDirectory() as copy:
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                shutil.copy(root / name, copy)
        shutil.copytree(root / "minina", Path(copy) / "minina", ignore=shutil.ignore_patterns("__pycache__"))
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                                 "-w", str(folder), copy], capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("minina-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"building minina's wheel failed: {result.stderr[-1500:]}")
    return wheels[-1]


def build_autograder(assignment, out, seed=0, timeout=300, notebook_timeout=None, visibility="visible",
                     extra_checks=None, memory=8):
    """Write Gradescope's autograder zip for assignment to out; returns its path."""
    if assignment not in ASSIGNMENTS:
        raise FileNotFoundError(f"unknown assignment {assignment!r}; known: {', '.join(ASSIGNMENTS)}")
    if extra_checks and not Path(extra_checks).is_file():
        raise FileNotFoundError(f"--extra-checks: no file {extra_checks}")
    extra = ' \\\n    --extra-checks "$ROOT/source/private_checks.py"' if extra_checks else ""
    run = RUN.format(assignment=assignment, seed=int(seed), timeout=f"{timeout:g}", visibility=shlex.quote(visibility),
                     notebook_timeout=f"{notebook_timeout or 4 * timeout:g}", memory=f"{memory:g}", extra=extra)
    with tempfile.TemporaryDirectory() as folder:
        wheel = build_wheel(folder)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, text in (("setup.sh", SETUP.format(wheel=wheel.name)), ("run_autograder", run)):
                info = zipfile.ZipInfo(name)
                info.external_attr = 0o755 << 16  # executable, as Gradescope expects
                archive.writestr(info, text)
            archive.write(wheel, wheel.name)
            if extra_checks:
                archive.write(extra_checks, "private_checks.py")
    return Path(out)
