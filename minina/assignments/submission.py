"""What a submission is and how its grades are written: which notebook is graded as which assignment, the rows,
the CSV and Gradescope's results.json (written atomically, by the grader only).

Each folder given is one submission: per assignment one notebook is graded (the handed-out name first, then the
one whose metadata names the assignment, then the first by name); the others are listed as ignored, never counted.
With a pinned assignment every notebook is a candidate for it and a notebook that says otherwise is noted.
"""
import csv
import io
import json
import os
import re
import tempfile
from pathlib import Path

import nbformat

from .checks import EXERCISES
from .exercises import ASSIGNMENTS

COLUMNS = ("notebook", "assignment", "exercise", "status", "points", "max_points", "message")
VISIBILITIES = ("visible", "hidden", "after_due_date", "after_published")
_ASSIGNMENT_ID = re.compile(r"""check\(\s*["'](A\d+)\.""")


def notebook_paths(path):
    """The .ipynb files directly inside folder path (not its subfolders), sorted; [path] for a file; [] if none."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.glob("*.ipynb") if not p.name.startswith("."))
    return [path] if path.is_file() else []


def metadata_problem(notebook):
    """What is wrong with a notebook's minina metadata (it should be {"assignment": "A1"} or absent), or ""."""
    metadata = notebook.get("metadata") if isinstance(notebook, dict) else None
    if not isinstance(metadata, dict):
        return f"its metadata is a {type(metadata).__name__}, not a dict: ignored"
    declared = metadata.get("minina", {})
    if not isinstance(declared, dict):
        return f'its metadata "minina" is a {type(declared).__name__}, not a dict like {{"assignment": "A1"}}: ignored'
    if not isinstance(declared.get("assignment", ""), str):
        return f'its metadata "minina.assignment" is a {type(declared["assignment"]).__name__}, not a str: ignored'
    return ""


def assignment_of(path, notebook=None):
    """The assignment id ("A1") of a notebook: its metadata, else its file name, else its check() calls."""
    if notebook is not None and not metadata_problem(notebook):
        declared = notebook.metadata.get("minina", {}).get("assignment")
        if declared in ASSIGNMENTS:
            return declared
    for assignment, (name, _) in ASSIGNMENTS.items():
        if Path(path).stem == name or Path(path).stem.startswith(name.split("_")[0] + "_"):
            return assignment
    for cell in notebook.get("cells", []) if isinstance(notebook, dict) else []:
        source = cell.get("source") if isinstance(cell, dict) and cell.get("cell_type") == "code" else None
        found = _ASSIGNMENT_ID.findall(source) if isinstance(source, str) else []
        if found and found[0] in ASSIGNMENTS:
            return found[0]
    return None


def _read(path):
    try:
        return nbformat.read(path, as_version=4)
    except Exception:
        return None


def plan(paths, pinned=None):
    """([(path, assignment, note)] to grade, [(path, reason)] ignored, [(path, message)] that name no assignment)."""
    graded, ignored, unknown = [], [], []
    for path in map(Path, paths):
        candidates = {}  # assignment -> [(rank, path, note)]
        for notebook_path in notebook_paths(path):
            notebook = _read(notebook_path)
            problem = metadata_problem(notebook) if notebook is not None else ""
            detected = assignment_of(notebook_path, notebook)
            assignment = pinned or detected
            if assignment is None:
                unknown.append((notebook_path, "; ".join(m for m in (problem, (
                    "could not tell which assignment this notebook is (name it like the handed-out notebook, or keep "
                    "its check() calls)")) if m)))
                continue
            note = "; ".join(m for m in (problem, f"this notebook says it is {detected}, graded as {pinned}"
                                         if pinned and detected and detected != pinned else "") if m)
            rank = (notebook_path.stem != ASSIGNMENTS[assignment][0], detected != assignment, notebook_path.name)
            candidates.setdefault(assignment, []).append((rank, notebook_path, note))
        for assignment, found in candidates.items():
            found.sort(key=lambda item: item[0])
            graded.append((found[0][1], assignment, found[0][2]))
            ignored += [(p, f"not graded: {found[0][1].name} is graded as {assignment}") for _, p, _ in found[1:]]
    return graded, ignored, unknown


def rows_for(path, assignment, status, message):
    """One row per exercise of assignment (one row if there is none), all with status and message, 0 points."""
    exercises = [e for e in EXERCISES.values() if e.assignment == assignment]
    if not exercises:
        return [dict(notebook=str(path), assignment=assignment or "", exercise="", status=status, points=0,
                     max_points=0, message=message)]
    return [dict(notebook=str(path), assignment=assignment, exercise=e.id, status=status, points=0,
                 max_points=e.points, message=message) for e in exercises]


def write_atomic(out, text):
    """Write text to out through a temporary file in the same folder and a rename: whole or not at all."""
    out = Path(out)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def gradescope_text(rows, execution_time, output="", visibility="visible"):
    """Gradescope's autograder results.json: a test per graded (notebook, exercise), the rest in `output`."""
    if visibility not in VISIBILITIES:
        raise ValueError(f"visibility must be one of {VISIBILITIES}, got {visibility!r}")
    graded = [row for row in rows if row["status"] != "ignored"]
    several = len({row["notebook"] for row in graded}) > 1
    tests, numbers = [], {}
    for row in graded:
        assignment = row["assignment"] or "?"
        numbers[assignment] = numbers.get(assignment, 0) + 1
        tests.append({"name": (f"{Path(row['notebook']).name}: " if several else "") + (
            row["exercise"] or row["assignment"] or "submission"),
            "number": f"{assignment.lstrip('A')}.{numbers[assignment]}", "score": row["points"],
            "max_score": row["max_points"], "status": "passed" if row["status"] == "passed" else "failed",
            "output": row["status"] + (f": {row['message']}" if row["message"] else ""),
            "output_format": "text", "visibility": visibility})
    lines = [output] if output else []
    lines += [f"{Path(row['notebook']).name}: {row['message']}" for row in rows if row["status"] == "ignored"]
    result = {"score": sum(row["points"] for row in graded), "execution_time": round(execution_time, 1),
              "output": "\n".join(lines), "output_format": "text", "visibility": visibility, "tests": tests}
    return json.dumps(result, indent=2) + "\n"


def summary_table(rows):
    """One line per notebook: points, and how many exercises passed, failed, were not attempted or errored."""
    lines = [f"{'notebook':<48} {'points':>9}  passed  failed  not attempted  error"]
    for notebook in dict.fromkeys(row["notebook"] for row in rows):
        mine = [row for row in rows if row["notebook"] == notebook]
        if all(row["status"] == "ignored" for row in mine):
            lines.append(f"{notebook if len(notebook) <= 48 else '…' + notebook[-47:]:<48} {'ignored':>9}")
            continue
        count = {status: sum(row["status"] == status for row in mine)
                 for status in ("passed", "failed", "not attempted", "error")}
        points = f"{sum(r['points'] for r in mine):g}/{sum(r['max_points'] for r in mine):g}"
        name = notebook if len(notebook) <= 48 else "…" + notebook[-47:]
        lines.append(f"{name:<48} {points:>9}  {count['passed']:>6}  {count['failed']:>6}  "
                     f"{count['not attempted']:>13}  {count['error']:>5}")
    return "\n".join(lines)
