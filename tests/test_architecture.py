"""The layout's rule, read from the source: the core never imports the tools, and no modules import each other in a
circle (lazy imports inside functions count too)."""
import ast
import pathlib
import re

import minina

PACKAGE = pathlib.Path(minina.__file__).parent
CORE = ("activations", "masks", "scores", "tiles", "attention", "chunked", "triton_kernels", "modules", "models")
TOOLS = ("minina.tools", "minina.assignments")


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """Every minina module that path imports, anywhere in the file, as absolute dotted names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import bench` imports the module bench, `from .data import x` data
                names.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
    return {name for name in names if name in modules and name != module_name(path)}


def import_graph():
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")
            if path.name != "__main__.py"}  # `python -m minina` is the entry point into the tools


def test_the_core_lists_every_top_level_module():
    top = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert top == set(CORE), "a new file in minina/ is core (add it to CORE) or a tool (put it in minina/tools/)"
    assert (PACKAGE / "tools" / "__init__.py").is_file()


def test_the_core_never_imports_the_tools():
    graph = import_graph()
    core = ["minina"] + [f"minina.{name}" for name in CORE]
    offending = {name: sorted(i for i in graph[name] if i.startswith(TOOLS)) for name in core}
    assert not any(offending.values()), offending


def test_no_import_cycle():
    graph = import_graph()
    assert "minina.tools.data" in graph["minina.tools.train_tasks"]  # the parser sees relative imports

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in graph.get(node, ()):
                if target == start:
                    return path + [start]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, path + [target]))
        return None

    cycles = [cycle_from(name) for name in graph]
    assert not [c for c in cycles if c is not None], [c for c in cycles if c is not None]


def test_the_architecture_page_matches_the_tree():
    """The course site's Architecture page (docs/architecture.md) names every file of the package, and no other."""
    section = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = section[section.index("# Architecture\n"):]
    named = set(re.findall(r"`((?:tools/)?[a-z_]+\.py)`", section))
    files = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
             if path.parent.name != "assignments" and path.name not in ("__init__.py", "__main__.py")}
    assert named == files, f"docs/architecture.md names {sorted(named - files)} that are gone, misses " \
                           f"{sorted(files - named)}"


def test_train_config_is_a_leaf_and_training_never_imports_the_study():
    """TrainConfig is plain data: its module imports nothing of minina; what checks, parses and runs it imports it.
    The study's options and hints stay in the study: nothing on the training path imports it."""
    graph = import_graph()
    assert graph["minina.tools.config"] == set()
    assert "minina.tools.config" in graph["minina.tools.train"] and "minina.tools.config" in graph[
        "minina.tools.train_flags"]
    training = ("config", "train", "train_flags", "train_tasks", "checkpoint")
    study = {"minina.tools.study", "minina.tools.candidates", "minina.tools.probes"}
    assert {name: graph[f"minina.tools.{name}"] & study for name in training} == {name: set() for name in training}
