"""The source rule: what a submitted notebook may contain, judged on its AST in the grader's process.

The runtime watch (probe.py) lives in the student's kernel, where a determined student can reach it; this rule reads
the cells the grader ran and cannot be reached from them. `source_violations(cells, spec)` returns one message per
construct it rejects, "cell 7, line 3: exec(...) is not allowed in graded code"; an exercise with any gets 0.

Two levels:
- **notebook-wide**, every code cell: nothing that tampers with the grader or the process (exec, eval, compile,
  __import__, setattr, getattr on a computed name, globals()/locals()/vars(), file reads, frames, imports beyond
  ALLOWED_MODULES, the names of BANNED_NAMES, os beyond os.environ, sys beyond `... in sys.modules`, importlib
  beyond the Colab set-up's two calls, minina.assignments beyond check and passed, attributes starting with "_",
  assignments into an imported module, shell escapes and magics other than %pip and %matplotlib);
- **per exercise**: the exercise's functions and everything they reach by name in the notebook's global scope
  (functions, classes, lambdas, the values of global assignments, import aliases, transitively) may not reach
  what the exercise forbids (_forbidden_objects() by label, plus minina's INTERNALS, which compute every
  exercise's answer, and the compilers of UNSEEN, whose code the runtime watch cannot follow). A score's `.split`
  is told from a tensor's by its receiver: a parameter (or an alias of one), `type(...)` or a NeuralScore built in
  place is a score; an attribute, item or call result (say `first.weight.split(P, dim=1)`) or `torch.split(...)`
  is a tensor. Code this misses meets the runtime watch.
"""
import ast
import importlib
import inspect
import sys
import types

from IPython.core.inputtransformer2 import TransformerManager

BANNED_CALLS = {"exec", "eval", "compile", "__import__", "breakpoint", "setattr", "delattr", "vars", "locals",
                "globals", "open", "input", "memoryview", "dir", "getattr"}  # getattr(x, "literal") is let through
ALLOWED_MODULES = {"math", "cmath", "statistics", "random", "itertools", "functools", "collections", "dataclasses",
                   "typing", "time", "datetime", "json", "re", "enum", "abc", "contextlib", "copy", "numbers",
                   "warnings", "pprint", "textwrap", "fractions", "decimal", "heapq", "bisect", "array", "__future__",
                   "os", "sys", "importlib", "torch", "numpy", "matplotlib", "triton", "minina", "einops", "scipy",
                   "seaborn", "tqdm", "IPython.display"}  # what a notebook may import (os, sys, importlib: see USES)
USES = {"os": {"os.environ", "os.environ.get", "os.environ.setdefault"},  # the only uses of these modules
        "sys": {"sys.modules", "sys.version", "sys.version_info", "sys.version_info.major",
                "sys.version_info.minor", "sys.platform", "sys.stdout.write", "sys.stdout.flush",
                "sys.stderr.write", "sys.stderr.flush"},
        "importlib": {"importlib.util.find_spec", "importlib.invalidate_caches", "importlib.util"},
        "minina.assignments": {"minina.assignments.check", "minina.assignments.passed"}}
BANNED_NAMES = {"torch.ops", "torch.library", "torch.load", "torch.from_file", "torch.hub", "torch.utils.cpp_extension",
                "torch.jit.load", "torch.package", "torch.multiprocessing", "torch.distributed", "numpy.load",
                "numpy.fromfile", "numpy.loadtxt", "numpy.genfromtxt", "numpy.memmap", "numpy.ctypeslib",
                "typing.get_type_hints"}  # code loaders, file readers, processes and string evaluators
FRAMES = {"gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code", "tb_frame", "tb_next", "f_back",
          "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "co_code", "co_consts", "co_names"}  # frames
DUNDERS = {"__version__", "__name__", "__doc__"}  # read-only strings: the notebooks print versions
MAGICS = {"pip", "matplotlib"}  # the line magics a notebook may use: the Colab install, inline plots
INTERNALS = ("minina.chunked", "minina.tiles", "minina.triton_kernels", "minina.modules", "minina.models")
UNSEEN = ("torch.jit", "torch.compile", "torch.fx", "torch.export")  # compiled code the runtime watch cannot follow


def _forbidden_objects():
    """label of probe.FORBIDDABLE -> objects the exercise's code may not reach (a module forbids all it holds)."""
    import torch

    from .. import attention, chunked, masks, modules, tiles

    try:
        from .. import triton_kernels
    except ImportError:  # no triton (macOS, Windows): no notebook can reach the kernels either
        triton_kernels = None
    fused = [getattr(torch, name) for name in dir(torch) if "scaled_dot_product" in name]
    return {"minina.masked_softmax": [masks.masked_softmax],
            "minina.attention_bias": [masks.attention_bias],
            "minina.dot_product_attention": [attention.dot_product_attention, attention.sdpa_attention,
                                             attention.attention_weights],
            "minina.neural_attention": [attention.neural_attention, chunked, tiles],
            "minina.triton_kernels": [triton_kernels] if triton_kernels else [],
            "minina.MultiHeadAttention": [modules],
            "NeuralScore.logits": [], "NeuralScore.split": [],  # judged by attribute, see _attribute_violation
            "nn.MultiheadAttention": [torch.nn.MultiheadAttention, torch.nn.functional.multi_head_attention_forward,
                                      torch.nn.Transformer, torch.nn.TransformerEncoderLayer,
                                      torch.nn.TransformerDecoderLayer],
            "F.scaled_dot_product_attention": [torch.nn.functional.scaled_dot_product_attention,
                                               importlib.import_module("torch.nn.attention")],  # flex_attention
            "an aten scaled_dot_product op": fused,
            "autograd (backward or torch.autograd.grad)": [torch.autograd, torch.func, torch.Tensor.backward,
                                                           torch.autograd.grad]}


FORBIDDEN_ATTRIBUTES = {"NeuralScore.logits": {"logits"},
                        "autograd (backward or torch.autograd.grad)": {"backward", "grad_fn", "register_hook"}}


def parse(cells):
    """[(cell index, tree)] of the code cells (index, source) that parse once IPython syntax is converted."""
    manager, trees = TransformerManager(), []
    for index, source in cells:
        try:
            trees.append((index, ast.parse(manager.transform_cell(source))))
        except (SyntaxError, ValueError):  # the kernel could not run it either
            continue
    return trees


def source_violations(cells, spec):
    """Messages naming each construct of cells ([(cell index, source)] as the grader ran them) that fails spec."""
    trees = parse(cells)
    scope = _Scope(trees)
    try:
        scope.resolve()
        messages = [f"cell {index}, line {node.lineno}: {what} is not allowed in graded code"
                    for index, tree in trees for node, what in _notebook_wide(tree, scope)]
        if spec.forbid:
            messages += _exercise_violations(scope, spec)
    except Intricate as error:
        messages = [f"{spec.id}: names bound too intricately for the grader to follow ({error})"]
    return list(dict.fromkeys(messages))


# ------------------------------------------------------------------------------------------------ name resolution


class _Scope:
    """The notebook's global names: each binding's (cell index, node, value) and what each import alias names."""

    def __init__(self, trees):
        self.bindings, self.imports, self.names = {}, {}, {}
        for index, tree in trees:
            for node in _top_level(tree.body):
                self._bind(index, node)
            for node in ast.walk(tree):  # := anywhere, and `global name` in a function, bind global names too
                if isinstance(node, ast.NamedExpr):
                    self._bind(index, node)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    declared = {n for s in _own_nodes(node) if isinstance(s, ast.Global) for n in s.names}
                    for name, value in _local_assignments(node):
                        if name in declared and isinstance(value, str):
                            self.imports.setdefault(name, set()).add(value)
                        elif name in declared:
                            self.bindings.setdefault(name, []).append((index, value))

    def _bind(self, index, node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.bindings.setdefault(node.name, []).append((index, node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias, dotted in _import_names(node):
                self.imports.setdefault(alias, set()).add(dotted)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.For, ast.AsyncFor, ast.With,
                               ast.AsyncWith, ast.NamedExpr)):
            value = getattr(node, "value", None) or getattr(node, "iter", None) or node
            for target in _targets(node):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        self.bindings.setdefault(name.id, []).append((index, value))

    def resolve(self):
        """Each global name's dotted names, to a fixed point (aliases may be bound in any order, even in a cycle)."""
        self.names, users = {name: set(dotted) for name, dotted in self.imports.items()}, {}
        for name, bindings in self.bindings.items():
            for _, value in bindings:
                for node in ast.walk(value) if isinstance(value, ast.expr) else ():
                    if isinstance(node, ast.Name):
                        users.setdefault(node.id, set()).add(name)
        work, steps = list(self.bindings), 0
        while work:
            name, steps = work.pop(), steps + 1
            new = set().union(*(self.dotted(value) for _, value in self.bindings[name] if isinstance(value, ast.expr)))
            if steps > 20000 or len(new) > 64:
                raise Intricate(name)
            if not new <= self.names.setdefault(name, set()):
                self.names[name] |= new
                work += users.get(name, ())

    def dotted(self, node, local=None, budget=None, visiting=frozenset()):
        """The dotted names (e.g. "torch.nn.functional.softmax") node may stand for, through imports and aliases;
        local: a function's own names -> the values assigned to them (none for a parameter)."""
        local, budget = local or {}, budget or [5000]
        budget[0] -= 1
        if budget[0] < 0:
            raise Intricate(ast.unparse(node)[:40])
        if isinstance(node, str):  # a local import's dotted name
            return {node}
        if isinstance(node, ast.Name):
            if node.id not in local:
                return set(self.names.get(node.id, ()))
            if node.id in visiting:
                return set()
            inner = visiting | {node.id}
            return set().union(*(self.dotted(value, local, budget, inner) for value in local[node.id]))
        if isinstance(node, ast.Attribute):
            return {f"{base}.{node.attr}" for base in self.dotted(node.value, local, budget, visiting)}
        if _is_literal_getattr(node):
            return {f"{base}.{node.args[1].value}" for base in self.dotted(node.args[0], local, budget, visiting)}
        if isinstance(node, (ast.IfExp, ast.BoolOp)):
            parts = (node.body, node.orelse) if isinstance(node, ast.IfExp) else node.values
            return set().union(*(self.dotted(part, local, budget, visiting) for part in parts))
        return set()


class Intricate(Exception):
    """Names bound so intricately that following them would cost the grader too much: a violation in itself."""


def _top_level(body):
    """The statements of a module body, into if/for/while/with/try blocks but not into functions or classes."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _top_level(inner)


def _targets(node):
    if isinstance(node, ast.Assign):
        return node.targets
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return [item.optional_vars for item in node.items if item.optional_vars is not None]
    return [node.target]


def _import_names(node):
    """(alias, dotted name) bound by an import statement."""
    if isinstance(node, ast.Import):
        return [(alias.asname or alias.name.split(".")[0], alias.name if alias.asname else alias.name.split(".")[0])
                for alias in node.names]
    module = "." * node.level + (node.module or "")
    return [(alias.asname or alias.name, f"{module}.{alias.name}") for alias in node.names]


def _is_literal_getattr(node):
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
            and len(node.args) in (2, 3) and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str))


# --------------------------------------------------------------------------------------------------- notebook-wide


def _notebook_wide(tree, scope):
    """(node, words) for each construct of tree that tampers with the grader or the process."""
    parents = _parents(tree)
    parents.update({("locals", id(node)): _locals(node) for node in ast.walk(tree)
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))})
    allowed = {id(inner) for node in ast.walk(tree) if _is_exit_code_read(node) for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from ((node, words) for words in _import_violations(node))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in BANNED_CALLS and not (node.id == "getattr" and _literal_getattr_parent(parents, node)):
                yield node, f"{node.id}(...)"
            elif node.id.startswith("__") and node.id not in DUNDERS:
                yield node, f"the name {node.id}"
            elif node.id == "get_ipython" and not _is_allowed_magic(parents, node):
                yield node, "a shell escape or magic other than %pip and %matplotlib"
        elif isinstance(node, ast.Attribute) and node.attr in FRAMES:
            yield node, f"the frame or code attribute .{node.attr}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and node.attr not in DUNDERS:
            yield node, f"the attribute .{node.attr}"
        elif _is_literal_getattr(node) and node.args[1].value.startswith("_"):
            yield node, f"the attribute .{node.args[1].value}"
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            for target in node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]:
                root = _root(target)
                if root is not target and scope.dotted(root) and not _is_local(parents, root):
                    yield node, f"changing {ast.unparse(target)} (part of the imported {min(scope.dotted(root))})"
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load) or _is_literal_getattr(node):
            for dotted in scope.dotted(node) if not _is_local(parents, _root(node)) else ():
                words = _use_violation(dotted, parents, node)
                if words:
                    yield node, words


def _use_violation(dotted, parents, node):
    """Why the use of dotted name at node is not allowed, or None."""
    if any(dotted == banned or dotted.startswith(banned + ".") for banned in BANNED_NAMES):
        return dotted
    for module, uses in USES.items():
        if dotted == module or not dotted.startswith(module + "."):
            continue
        if dotted == "sys.modules" and not _is_membership_test(parents, node):
            return "sys.modules other than `name in sys.modules`"
        if not any(dotted == use or use.startswith(dotted + ".") for use in uses):
            return dotted
    return None


def _import_violations(node):
    for alias in node.names:
        module = node.module if isinstance(node, ast.ImportFrom) else alias.name
        if isinstance(node, ast.ImportFrom) and node.level:
            yield "a relative import"
            continue
        full = f"{module}.{alias.name}" if isinstance(node, ast.ImportFrom) else module
        parts = full.split(".")
        if alias.name == "*":
            yield f"from {module} import *"
        elif (any(part.startswith("_") for part in parts)
              or parts[0] not in ALLOWED_MODULES and ".".join(parts[:2]) not in ALLOWED_MODULES
              or parts[0] == "importlib" and full not in ("importlib", "importlib.util")
              or full.startswith("minina.assignments.") and full not in USES["minina.assignments"]
              or any(full == banned or full.startswith(banned + ".") for banned in BANNED_NAMES)):
            yield f"importing {full}"


def _parents(tree):
    return {id(child): parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _is_exit_code_read(node):
    """globals().get("_exit_code", 0): the Colab set-up cell's read of %pip's exit status."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and isinstance(node.func.value, ast.Call) and isinstance(node.func.value.func, ast.Name)
            and node.func.value.func.id == "globals" and not node.func.value.args
            and [ast.unparse(a) for a in node.args] == ["'_exit_code'", "0"] and not node.keywords)


def _literal_getattr_parent(parents, name):
    parent = parents.get(id(name))
    return _is_literal_getattr(parent) and parent.func is name


def _is_allowed_magic(parents, name):
    """get_ipython().run_line_magic('pip' or 'matplotlib', literal): what %pip and %matplotlib become."""
    call = parents.get(id(name))
    method = parents.get(id(call))
    outer = parents.get(id(method))
    return (isinstance(method, ast.Attribute) and method.attr == "run_line_magic" and isinstance(outer, ast.Call)
            and outer.func is method and outer.args and isinstance(outer.args[0], ast.Constant)
            and outer.args[0].value in MAGICS and all(isinstance(a, ast.Constant) for a in outer.args))


def _is_membership_test(parents, node):
    parent = parents.get(id(node))
    return (isinstance(parent, ast.Compare) and len(parent.ops) == 1 and isinstance(parent.ops[0], (ast.In, ast.NotIn))
            and parent.comparators[0] is node)


def _root(node):
    """The name an attribute, item or literal-getattr chain starts from (node itself when it is none of these)."""
    while True:
        if isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        elif _is_literal_getattr(node):
            node = node.args[0]
        else:
            return node


def _is_local(parents, name):
    """Whether name is a parameter or local of the function it is used in (then it does not stand for an import).

    parents: the tree's child -> parent map, plus each function's id -> its local names (see _notebook_wide)."""
    if not isinstance(name, ast.Name):
        return False
    node = name
    while id(node) in parents:
        node = parents[id(node)]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return name.id in parents[("locals", id(node))]
    return False


def _locals(function):
    """The names a function (or lambda) binds itself: parameters, assignment and loop targets, imports, defs."""
    arguments = function.args
    names = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    names |= {a.arg for a in (arguments.vararg, arguments.kwarg) if a}
    declared = set()
    for node in _own_nodes(function):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not function:
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias for alias, _ in _import_names(node)}
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            declared |= set(node.names)
    return names - declared


def _own_nodes(function):
    """The nodes of a function's body, not those of functions or lambdas nested in it (their defs included)."""
    body = function.body if isinstance(function.body, list) else [function.body]
    stack = list(body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


# ---------------------------------------------------------------------------------------------------- per exercise


def _exercise_violations(scope, spec):
    """Messages for what spec's functions reach, by name through the notebook, that spec forbids."""
    forbidden = _forbidden_objects()
    objects = [obj for label in spec.forbid for obj in forbidden.get(label, ())]
    objects += [sys.modules[name] for name in INTERNALS if name in sys.modules]
    objects += [obj for obj in map(_resolve, UNSEEN) if obj is not None]
    attributes = set().union(*(FORBIDDEN_ATTRIBUTES.get(label, set()) for label in spec.forbid))
    messages, seen, queue = [], set(), list(spec.names)
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        seen.add(name)
        for dotted in scope.imports.get(name, ()):
            if _reaches(dotted, objects):
                messages.append(f"{spec.id} uses {dotted} (imported as {name}): write it yourself")
        for index, node in scope.bindings.get(name, ()):
            for part, local in _parts(node):
                where = f"cell {index}, line {getattr(part, 'lineno', '?')}"
                words = _part_violation(part, local, scope, objects, attributes, "NeuralScore.split" in spec.forbid)
                if words:
                    messages.append(f"{where}: {spec.id} uses {words}: write it yourself")
                if isinstance(part, ast.Name) and isinstance(part.ctx, ast.Load) and part.id not in local:
                    queue.append(part.id)
    return messages


def _parts(node):
    """(node, the local names of the function it is in) for every node of a binding: a def, class or value."""
    def visit(current, local):
        if isinstance(current, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for default in current.args.defaults + [d for d in current.args.kw_defaults if d]:
                yield from visit(default, local)
            for decorator in getattr(current, "decorator_list", ()):
                yield from visit(decorator, local)
            inner = {**local, **{name: [] for name in _locals(current)}}
            for target, value in _local_assignments(current):
                inner.setdefault(target, []).append(value)
            for child in (current.body if isinstance(current.body, list) else [current.body]):
                yield from visit(child, inner)
            return
        yield current, local
        for child in ast.iter_child_nodes(current):
            yield from visit(child, local)
    yield from visit(node, {})


def _local_assignments(function):
    """(name, value) of each plain `name = value` in a function's own body, and (name, dotted name) of each import
    in it: its local aliases."""
    for node in _own_nodes(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    yield target.id, node.value
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from _import_names(node)


def _part_violation(part, local, scope, objects, attributes, split_forbidden):
    """Words naming the forbidden thing part uses, or None."""
    if isinstance(part, (ast.Import, ast.ImportFrom)):  # an import inside a function
        return next((dotted for _, dotted in _import_names(part) if _reaches(dotted, objects)), None)
    attribute, receiver = ((part.attr, part.value) if isinstance(part, ast.Attribute) else
                           (part.args[1].value, part.args[0]) if _is_literal_getattr(part) else (None, None))
    if attribute in attributes:
        return f".{attribute} ({ast.unparse(part)[:60]})"
    if split_forbidden and attribute == "split" and _score_like(receiver, local, scope):
        return f"NeuralScore.split ({ast.unparse(part)[:60]}; for a tensor write torch.split(tensor, ...))"
    if isinstance(part, (ast.Name, ast.Attribute)) and isinstance(part.ctx, ast.Load) or _is_literal_getattr(part):
        for dotted in scope.dotted(part, local):
            if _reaches(dotted, objects):
                return dotted
    return None


def _score_like(node, local, scope, budget=None, visiting=frozenset()):
    """Whether node may be a NeuralScore: a parameter or alias of one, type(...), or a NeuralScore built in place."""
    budget = budget or [2000]
    budget[0] -= 1
    if budget[0] < 0:
        raise Intricate(ast.unparse(node)[:40])
    if isinstance(node, str):  # a local import's dotted name
        return _is_score_class(node)
    if isinstance(node, ast.Name):
        if node.id in visiting:
            return False
        inner = visiting | {node.id}
        if node.id in local:
            return not local[node.id] or any(_score_like(v, local, scope, budget, inner) for v in local[node.id])
        return any(_score_like(v, {}, scope, budget, inner) for _, v in scope.bindings.get(node.id, ())
                   if isinstance(v, ast.expr)) or any(_is_score_class(d) for d in scope.dotted(node))
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Name) and node.func.id == "type":
            return True
        return any(_is_score_class(d) for d in scope.dotted(node.func, local))
    return any(_is_score_class(d) for d in scope.dotted(node, local))


def _is_score_class(dotted):
    from ..scores import NeuralScore

    obj = _resolve(dotted)
    return isinstance(obj, type) and issubclass(obj, NeuralScore)


def _resolve(dotted):
    """The object dotted names in this process (only under torch and minina, read without running any code)."""
    parts = dotted.split(".")
    if parts[0] not in ("torch", "minina") or parts[0] not in sys.modules:
        return None
    obj = sys.modules[parts[0]]
    for part in parts[1:]:
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            return None
    return obj


def _reaches(dotted, objects):
    """Whether dotted, or a module on its path, is one of objects (or defined in a module among them)."""
    parts = dotted.split(".")
    for end in range(1, len(parts) + 1):
        obj = _resolve(".".join(parts[:end]))
        if obj is None:
            continue
        if any(obj is target for target in objects):
            return True
        module = getattr(obj, "__module__", None) if not isinstance(obj, types.ModuleType) else None
        if isinstance(module, str) and any(isinstance(t, types.ModuleType) and module == t.__name__ for t in objects):
            return True
        if isinstance(obj, (staticmethod, classmethod)) and any(obj.__func__ is t for t in objects):
            return True
    return False

