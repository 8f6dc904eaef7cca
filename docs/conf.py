"""Sphinx configuration of minina's course site: `sphinx-build -W --keep-going -b html docs docs/_build/html`.

Sphinx reads pages only under docs/, and the notebooks live in notebooks/. Rather than keep a second copy in git, the
build copies notebooks/*.ipynb and the students' notebooks/assignments/*.ipynb into docs/notebooks/ (ignored by git)
each time it starts, so a page's path on the site is the notebook's path in the repository. The solutions are never
copied. MyST-NB renders each notebook from its committed outputs; nothing is executed.

Why Sphinx with MyST-NB and sphinx-book-theme: all three are Python packages whose assets (the theme's scripts,
styles and icon fonts; MathJax through sphinx-mathjax-offline) install with pip and are copied into the site, so the
build and the built pages need no network and no server; Jupyter Book 1 is this same stack behind a config file,
and Jupyter Book 2 needs Node.js and fetches its site template when it first builds.
"""
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REPOSITORY = "https://github.com/minina-org/minina"
# links in the notebooks to a folder of the repository, and the site's page for that folder (from docs/notebooks/)
FOLDER_PAGES = {"](assignments/)": "](../assignments.md)"}


def copy_notebooks():
    """docs/notebooks/ as notebooks/ minus the solutions: the chapters and the student assignments, nothing else."""
    target = DOCS / "notebooks"
    shutil.rmtree(target, ignore_errors=True)
    (target / "assignments").mkdir(parents=True)
    for pattern in ("0*.ipynb", "assignments/a*.ipynb"):
        for path in sorted((ROOT / "notebooks").glob(pattern)):
            text = path.read_text(encoding="utf-8")
            for link, page in FOLDER_PAGES.items():
                text = text.replace(link, page)
            (target / path.relative_to(ROOT / "notebooks")).write_text(text, encoding="utf-8")


copy_notebooks()

project = "minina"
author = "the minina authors"
copyright = "2025, the minina authors"
extensions = [
    "myst_nb",                   # Markdown pages and notebooks (its own MyST parser included)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx-mathjax-offline",    # MathJax 3 copied into _static/: math typesets without a network
]
exclude_patterns = ["_build", "README.md"]
templates_path = ["_templates"]
# .rst first: autosummary writes its generated pages with the first suffix, and they are reStructuredText
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# The notebooks' committed outputs are the pages: never re-executed here, so the build needs neither data nor time.
nb_execution_mode = "off"
nb_ipywidgets_js = {}            # widget outputs show as text; no widget scripts from a CDN
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_dmath_double_inline = True  # the notebooks write $$...$$ inside a paragraph too, as Jupyter allows
myst_heading_anchors = 3
suppress_warnings = ["mystnb.unknown_mime_type"]

# The API pages come from the docstrings of the modules listed in docs/api.md. triton is optional (none on macOS).
autosummary_generate = True
autodoc_mock_imports = ["triton"]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False  # torch.autograd.Function's docstrings are not minina's

html_theme = "sphinx_book_theme"
html_title = "minina"
html_static_path = ["_static"]
html_css_files = ["minina.css"]
html_theme_options = {
    "repository_url": REPOSITORY,
    "repository_branch": "main",
    "path_to_docs": "",  # a notebook page notebooks/X is notebooks/X.ipynb in the repository: Colab's path
    "use_repository_button": True,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "navigation_with_keys": False,
}
html_last_updated_fmt = None


def docstring_as_written(app, what, name, obj, options, lines):
    """minina's docstrings are plain text (shapes, equations, tables), written for help(), not reStructuredText:
    each is shown as written, in a block that keeps its line breaks, so no markup in it is misread."""
    while lines and not lines[-1].strip():
        lines.pop()
    text = []  # a paragraph's lines joined, so the page wraps them; indented lines and list items kept as written
    for line in lines:
        starts_paragraph = not text or not text[-1] or text[-1].startswith(" ") or line.startswith((" ", "- "))
        if line and not starts_paragraph:
            text[-1] += " " + line
        else:
            text.append(line)
    if text:
        lines[:] = [".. code-block:: none", "   :class: docstring", ""] + ["   " + line for line in text] + [""]


def badges_as_text(app, doctree, docname):
    """The notebooks' "Open In Colab" badge is an image on colab.research.google.com; the site shows it as a
    local button, so a page loads nothing from the network."""
    from docutils import nodes

    for image in list(doctree.findall(nodes.image)):
        if image["uri"].startswith(("http://", "https://")):
            label = image.get("alt", "") or "link"
            image.replace_self(nodes.inline(label, label, classes=["badge-button"]))


def exercise_table():
    """The graded exercises, read from minina.assignments' own registry: a table that cannot drift from the checks."""
    from docutils import nodes
    from docutils.parsers.rst import Directive

    class ExerciseTable(Directive):
        def run(self):
            from minina.assignments.checks import EXERCISES
            from minina.assignments.exercises import ATTENTION_CALLS

            rows = [("exercise", "the student writes", "points", "forbidden calls")]
            for spec in EXERCISES.values():
                forbid = [label for label in spec.forbid if label not in ATTENTION_CALLS]
                if set(ATTENTION_CALLS) <= set(spec.forbid):
                    forbid.append("attention")
                rows.append((spec.id, ", ".join(spec.names), str(spec.points), ", ".join(forbid) or "-"))
            table, group = nodes.table(), nodes.tgroup(cols=4)
            table += group
            group += [nodes.colspec(colwidth=width) for width in (3, 4, 1, 6)]
            head, body = nodes.thead(), nodes.tbody()
            group += [head, body]
            for index, row in enumerate(rows):
                line = nodes.row()
                for cell in row:
                    text = nodes.literal(cell, cell) if index and cell != "-" and row.index(cell) < 2 else \
                        nodes.Text(cell)
                    line += nodes.entry("", nodes.paragraph("", "", text))
                (head if index == 0 else body).append(line)
            return [table]

    return ExerciseTable


def setup(app):
    app.add_directive("exercise-table", exercise_table())
    app.connect("autodoc-process-docstring", docstring_as_written)
    app.connect("doctree-resolved", badges_as_text)
