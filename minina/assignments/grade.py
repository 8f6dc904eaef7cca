"""Grade submitted notebooks: run each in a fresh kernel, then every exercise's checks on the names it defined.

A cell that fails (a syntax error, an exception, a time-out) does not stop the run: the other cells still
execute, and an exercise whose names are missing afterwards gets an "error" row that says which cells failed.
Each exercise's checks run as their own cell with the same time limit, so an endless loop costs one row.
The grader never raises on a bad submission; rows go to CSV or to Gradescope's results.json.
"""
import csv
import json
import re
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .checks import EXERCISES, GRADE_MARKER
from .exercises import ASSIGNMENTS

COLUMNS = ("notebook", "assignment", "exercise", "status", "points", "max_points", "message")
_ASSIGNMENT_ID = re.compile(r"""check\(\s*["'](A\d+)\.""")


def notebook_paths(paths):
    """The .ipynb files named, or directly inside the folders named (not their subfolders), sorted per folder."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.glob("*.ipynb") if not p.name.startswith("."))
        else:
            found.append(path)
    return found


def assignment_of(path, notebook=None):
    """The assignment id ("A1") of a notebook: its metadata, else its file name, else its check() calls."""
    if notebook is not None:
        declared = notebook.metadata.get("minina", {}).get("assignment")
        if declared in ASSIGNMENTS:
            return declared
    for assignment, (name, _) in ASSIGNMENTS.items():
        if Path(path).stem == name or Path(path).stem.startswith(name.split("_")[0] + "_"):
            return assignment
    if notebook is not None:
        for cell in notebook.cells:
            found = _ASSIGNMENT_ID.findall(cell.source) if cell.cell_type == "code" else []
            if found and found[0] in ASSIGNMENTS:
                return found[0]
    return None


def _rows(path, assignment, status, message):
    exercises = [e for e in EXERCISES.values() if e.assignment == assignment]
    if not exercises:
        return [dict(notebook=str(path), assignment=assignment or "", exercise="", status=status, points=0,
                     max_points=0, message=message)]
    return [dict(notebook=str(path), assignment=assignment, exercise=e.id, status=status, points=0,
                 max_points=e.points, message=message) for e in exercises]


def _cell_errors(notebook):
    """'cell N: Name: value' for each code cell whose outputs hold an error."""
    errors = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output.get('ename')}: {str(output.get('evalue'))[:120]}")
    return errors


def grade_notebook(path, seed=0, timeout=300):
    """The grade rows of one notebook (dicts with COLUMNS); never raises for a bad submission."""
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:
        return _rows(path, assignment_of(path), "error", f"not a readable notebook: {type(error).__name__}: {error}")
    assignment = assignment_of(path, notebook)
    if assignment is None:
        return _rows(path, None, "error", "could not tell which assignment this notebook is (name it like the "
                                          "handed-out notebook, or keep its check() calls)")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", allow_errors=True,
                            interrupt_on_timeout=True, record_timing=False,
                            error_on_timeout={"ename": "CellTimeoutError",
                                              "evalue": f"the cell ran longer than {timeout} s and was interrupted",
                                              "traceback": []},
                            resources={"metadata": {"path": str(Path(path).resolve().parent)}})
    rows = []
    try:
        with client.setup_kernel():
            for index, cell in enumerate(notebook.cells):
                if cell.cell_type == "code":
                    client.execute_cell(cell, index)
            errors = _cell_errors(notebook)
            for spec in (e for e in EXERCISES.values() if e.assignment == assignment):
                probe = nbformat.v4.new_code_cell(
                    "from minina.assignments.checks import grade_in_namespace as __minina_grade\n"
                    f"__minina_grade({spec.id!r}, globals(), {int(seed)})")
                notebook.cells.append(probe)  # nbclient records outputs in the notebook, so the cell lives there
                client.execute_cell(probe, len(notebook.cells) - 1)
                rows.append(_probe_row(path, spec, probe, errors))
    except Exception as error:  # the kernel died or would not start: what is left could not be checked
        graded = {row["exercise"] for row in rows}
        rows += [row for row in _rows(path, assignment, "error", f"the notebook could not be run to the end: "
                                                                 f"{type(error).__name__}: {error}")
                 if row["exercise"] not in graded]
    return rows


def _probe_row(path, spec, probe, errors):
    row = dict(notebook=str(path), assignment=spec.assignment, exercise=spec.id, status="error", points=0,
               max_points=spec.points, message="")
    for output in probe.outputs:
        if output.get("output_type") == "stream":
            for line in output.get("text", "").splitlines():
                if line.startswith(GRADE_MARKER):
                    result = json.loads(line[len(GRADE_MARKER):])
                    row.update(status=result["status"], points=result["points"], message=result["message"])
                    if result["status"] == "error" and errors:
                        row["message"] += f" ({'; '.join(errors[:3])})"
                    return row
        if output.get("output_type") == "error":
            row["message"] = f"the check could not run: {output.get('ename')}: {str(output.get('evalue'))[:200]}"
            return row
    row["message"] = "the check printed no result"
    return row


def write_csv(rows, out):
    with open(out, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_gradescope(rows, out):
    """Gradescope's autograder results.json: one test per (notebook, exercise)."""
    several = len({row["notebook"] for row in rows}) > 1
    tests = [{"name": (f"{Path(row['notebook']).name}: " if several else "") + (row["exercise"] or row["assignment"]),
              "score": row["points"], "max_score": row["max_points"],
              "output": row["status"] + (f": {row['message']}" if row["message"] else "")} for row in rows]
    Path(out).write_text(json.dumps({"tests": tests}, indent=2) + "\n", encoding="utf-8")


def summary_table(rows):
    """One line per notebook: points, and how many exercises passed, failed, were not attempted or errored."""
    lines = [f"{'notebook':<48} {'points':>9}  passed  failed  not attempted  error"]
    for notebook in dict.fromkeys(row["notebook"] for row in rows):
        mine = [row for row in rows if row["notebook"] == notebook]
        count = {status: sum(row["status"] == status for row in mine)
                 for status in ("passed", "failed", "not attempted", "error")}
        points = f"{sum(r['points'] for r in mine):g}/{sum(r['max_points'] for r in mine):g}"
        name = notebook if len(notebook) <= 48 else "…" + notebook[-47:]
        lines.append(f"{name:<48} {points:>9}  {count['passed']:>6}  {count['failed']:>6}  "
                     f"{count['not attempted']:>13}  {count['error']:>5}")
    return "\n".join(lines)


def grade(paths, out, seed=0, timeout=300, format="csv"):
    """Grade every notebook in paths, write out (CSV or Gradescope JSON), print the summary; returns the rows."""
    rows, start = [], time.perf_counter()
    for path in notebook_paths(paths):
        rows += grade_notebook(path, seed=seed, timeout=timeout)
    (write_gradescope if format == "gradescope" else write_csv)(rows, out)
    print(summary_table(rows))
    print(f"\n{len(rows)} rows written to {out} in {time.perf_counter() - start:.0f} s")
    return rows
