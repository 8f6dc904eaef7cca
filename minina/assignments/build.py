"""Student notebooks from solution notebooks: one source per assignment, markers in the cell text.

Code cells:
  `# BEGIN SOLUTION [id]` ... `# END SOLUTION`   the lines between become `raise NotImplementedError("<id>")` at the
                                                  block's indentation; id defaults to the first check("...") id in
                                                  this cell or a later one
  `x = foo()  # SOLUTION`                         the right-hand side becomes `...`: `x = ...` (`return ...`, or a
                                                  bare `...` for a line that is not an assignment)
  `# BEGIN HIDDEN TESTS` ... `# END HIDDEN TESTS` removed, markers included
Markdown cells:
  `<!-- BEGIN SOLUTION -->` ... `<!-- END SOLUTION -->`  replaced by the placeholder ANSWER_PLACEHOLDER
A code cell left empty by these rules is dropped; outputs, execution counts and cell metadata are cleared.
"""
import copy
import re
from pathlib import Path

import nbformat

ANSWER_PLACEHOLDER = "**Your answer:** *(write it here)*"
_CHECK_ID = re.compile(r"""check\(\s*["']([A-Za-z0-9_]+\.[A-Za-z0-9_]+)["']""")
_ONE_LINE = re.compile(r"^(?P<indent>\s*)(?P<target>return\b|[\w.\[\]\s,()*]+?\s*(?<![=!<>])=(?!=))?"
                       r".*?\s*#\s*SOLUTION\s*$")
_MARKDOWN_BLOCK = re.compile(r"<!--\s*BEGIN SOLUTION\s*-->.*?<!--\s*END SOLUTION\s*-->", re.S)


class MarkerError(ValueError):
    """A solution notebook whose markers do not pair up."""


def _strip_code(source, default_id, where):
    lines, out, block = source.split("\n"), [], None  # block: (marker "solution" | "hidden", indent, id)
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("# BEGIN SOLUTION") or stripped == "# BEGIN HIDDEN TESTS":
            if block:
                raise MarkerError(f"{where}, line {number}: {stripped!r} inside an open block")
            marker = "solution" if "SOLUTION" in stripped else "hidden"
            exercise_id = stripped[len("# BEGIN SOLUTION"):].strip() or default_id
            block = (marker, line[: len(line) - len(line.lstrip())], exercise_id)
        elif stripped in ("# END SOLUTION", "# END HIDDEN TESTS"):
            if not block or (block[0] == "solution") != (stripped == "# END SOLUTION"):
                raise MarkerError(f"{where}, line {number}: {stripped!r} without its BEGIN")
            if block[0] == "solution":
                out.append(f'{block[1]}raise NotImplementedError("{block[2]}")')
            block = None
        elif block is None:
            match = _ONE_LINE.match(line)
            if match:
                out.append(f"{match['indent']}{(match['target'] or '').strip()}{' ' if match['target'] else ''}...")
            else:
                out.append(line)
    if block:
        raise MarkerError(f"{where}: a BEGIN {block[0].upper()} block is never closed")
    return "\n".join(out).strip("\n")


def student_notebook(solution, name="notebook"):
    """The student version (a new NotebookNode) of a solution notebook."""
    student = copy.deepcopy(solution)
    ids = [(_CHECK_ID.findall(cell.source) or [None])[0] if cell.cell_type == "code" else None
           for cell in solution.cells]
    cells = []
    for index, cell in enumerate(student.cells):
        where = f"{name}, cell {index}"
        cell.metadata = {}
        if cell.cell_type == "code":
            default_id = next((i for i in ids[index:] if i), name)
            cell.source = _strip_code(cell.source, default_id, where)
            cell.outputs, cell.execution_count = [], None
            if not cell.source.strip():
                continue
        elif cell.cell_type == "markdown":
            cell.source = _MARKDOWN_BLOCK.sub(ANSWER_PLACEHOLDER, cell.source)
            if "BEGIN SOLUTION" in cell.source or "END SOLUTION" in cell.source:
                raise MarkerError(f"{where}: unpaired <!-- BEGIN/END SOLUTION --> in Markdown")
        cells.append(cell)
    student.cells = cells
    student.metadata.pop("widgets", None)
    return student


def render(notebook):
    """The exact text a notebook is written as (stable, so build --check can compare)."""
    return nbformat.writes(notebook, version=4) + "\n"


def build(folder="notebooks/assignments", check=False):
    """Write (or, with check=True, compare) every student notebook from folder/solutions/*.ipynb.

    Returns a list of problems: student notebooks that differ from what build would write or are missing, and
    student notebooks with no solution source. Raises FileNotFoundError without a solutions folder.
    """
    folder = Path(folder)
    sources = sorted((folder / "solutions").glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no solution notebooks in {folder / 'solutions'}; run from the repository root "
                                f"or pass --dir")
    problems = []
    for source in sources:
        text = render(student_notebook(nbformat.read(source, as_version=4), source.stem))
        target = folder / source.name
        if check:
            if not target.is_file():
                problems.append(f"{target}: missing (python -m minina assignments build writes it)")
            elif target.read_text(encoding="utf-8") != text:
                problems.append(f"{target}: differs from what build would write from {source}")
        else:
            target.write_text(text, encoding="utf-8")
    names = {source.name for source in sources}
    problems += [f"{path}: no solution source {folder / 'solutions' / path.name}"
                 for path in sorted(folder.glob("*.ipynb")) if path.name not in names]
    return problems
