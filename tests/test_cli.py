"""The README's quick start and the command line, run as a user would."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

from minina.__main__ import COMMANDS

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs():
    text = README.read_text(encoding="utf-8")
    snippet = re.search(r"## Quick start\n+```python\n(.*?)```", text, re.S).group(1)
    exec(compile(snippet, "README quick start", "exec"), {})


def test_demo_command_prints_table():
    result = subprocess.run([sys.executable, "-m", "minina", "demo", "--seeds", "2", "--steps", "30"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("dot    ", "neural    "))]
    assert [row[0] for row in rows] == ["dot", "neural"]
    assert all(len(row) == 1 + 2 + 3 for row in rows)  # kind, 2 seeds, "mean ± std"


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "minina", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def without_unix_only_modules(tmp_path):
    """An environment whose Python processes cannot import resource and fcntl (Unix only), as on Windows."""
    shim = tmp_path / "windows_like"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nfor name in ("resource", "fcntl"):\n'
                                           '    sys.modules[name] = None  # as on Windows\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_cli_runs_without_unix_only_modules(tmp_path):
    env = without_unix_only_modules(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import resource"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the shim works
    helps = "".join(f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as end:\n    assert end.code == 0\n"
                    for command in COMMANDS)  # every command's --help, in one process to spare start-ups
    result = subprocess.run([sys.executable, "-c", "from minina.__main__ import main\n" + helps], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("usage: python -m minina") == len(COMMANDS), result.stderr
    demo = subprocess.run([sys.executable, "-m", "minina", "demo", "--seeds", "1", "--steps", "20"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0 and "on 1 CPU thread." in demo.stdout, demo.stderr
    bench = subprocess.run([sys.executable, "-m", "minina", "bench", "--ns", "32", "--backends", "sdpa", "chunked",
                            "--heads", "2", "--repeats", "0", "--threads", "1", "--out", str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    with open(tmp_path / "bench.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["backend"] for row in rows] == ["sdpa", "chunked"] and all(float(row["peak_mib"]) >= 0 for row in rows)
