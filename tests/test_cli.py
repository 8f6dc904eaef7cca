"""The README's quick start and the command line, run as a user would."""
import re
import subprocess
import sys
from pathlib import Path

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
