"""The grader's two lines against "your own code did the work": the source rule (rules.source_violations) and the
runtime watch in the kernel (probe.execute). One test per way a determined student got unearned points from the
watch alone; each names why it passed before (the watch ran in the student's process, matched file names, missed
threads, aten's `_op`, autograd's engine, forward mode and minina's internals, and let lazy outputs compute after
it); every solution and a few honest variants pass both lines untouched.
"""
import os
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import torch
from test_assignments import FOLDER, SOLUTIONS, run_cell  # pytest puts tests/ on the path

import minina
from minina.assignments import EXERCISES
from minina.assignments.checks import run_exercise
from minina.assignments.probe import execute
from minina.assignments.rules import source_violations

STUDENT = sorted(FOLDER.glob("a*.ipynb"))


def cells_of(path):
    notebook = nbformat.read(path, as_version=4)
    return [(index, cell.source) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"]


def violations(exercise_id, *sources, base=None):
    """source_violations of exercise_id on the solution notebook of its assignment (or base) plus cells sources."""
    path = base or next(p for p in SOLUTIONS if p.name.startswith(exercise_id[:2].lower()))
    cells = cells_of(path)
    return source_violations(cells + [(100 + i, source) for i, source in enumerate(sources)], EXERCISES[exercise_id])


def only(messages, *words):
    assert messages and all(any(w in m for m in messages) for w in words), messages
    return messages


def namespace(path, *extra):
    """The names a solution notebook defines (its cells run as the kernel runs them, checks left out), plus extra."""
    names = {"__name__": "__main__"}
    cells = [source for _, source in cells_of(path)[1:] if "check(" not in source and "passed(" not in source]
    for index, source in enumerate([*cells, *extra]):
        run_cell(source, names, f"{path.stem}-{index}")
    return names


def watched(exercise_id, function, *args):
    return execute(function, args, {}, EXERCISES[exercise_id].forbid)


# ------------------------------------------------------------------------------------- every solution, and variants


@pytest.mark.parametrize("path", SOLUTIONS + STUDENT, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_solutions_and_student_notebooks_break_no_rule(path):
    assignment = nbformat.read(path, as_version=4).metadata["minina"]["assignment"]
    for exercise_id, spec in EXERCISES.items():
        if spec.assignment == assignment:
            assert source_violations(cells_of(path), spec) == [], exercise_id


HONEST = {  # exercise -> cells a student may write: helpers, lambdas, comprehensions, torch.where / masked_fill
    "A1.masked_softmax": [
        "def shifted(x):\n    top = x.amax(dim=-1, keepdim=True)\n    return x - top.masked_fill(top == -math.inf, 0)\n"
        "\nnormalise = lambda p: p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)\n\n"
        "def masked_softmax(logits):\n    return normalise(torch.exp(shifted(logits)))",
        "def masked_softmax(logits):\n    last = [d for d in range(logits.dim())][-1]\n"
        "    empty = (logits == -math.inf).all(dim=last, keepdim=True)\n"
        "    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=last)\n"
        "    return torch.where(empty, torch.zeros_like(weights), weights)"],
    "A4.split_first_layer": [
        "def split_first_layer(q, k, score):\n    first = score.mlp[0]\n"
        "    w_q, w_k = first.weight.split(score.proj_dim, dim=1)\n"
        "    return score.q_proj(q) @ w_q.T + first.bias, score.k_proj(k) @ w_k.T",
        "class Split:\n    def __call__(self, q, k, score):\n        w = score.mlp[0].weight\n"
        "        w_q, w_k = torch.split(w, score.proj_dim, dim=1)\n"
        "        return score.q_proj(q) @ w_q.T + score.mlp[0].bias, score.k_proj(k) @ w_k.T\n\n"
        "split_first_layer = Split()"],
    "A5.softmax_backward": [
        "def row_dot(a, b):\n    return (a * b).sum(dim=-1, keepdim=True)\n\n"
        "def softmax_backward(p, v, grad_out):\n    grad_p = grad_out @ v.T\n"
        "    return p.T @ grad_out, p * (grad_p - row_dot(p, grad_p))"],
}


@pytest.mark.parametrize("exercise_id, source", [(e, s) for e, sources in HONEST.items() for s in sources])
def test_honest_variants_pass_both_lines(exercise_id, source):
    path = next(p for p in SOLUTIONS if p.name.startswith(exercise_id[:2].lower()))
    assert violations(exercise_id, source) == []
    names = namespace(path, source)
    result = run_exercise(exercise_id, [names[name] for name in EXERCISES[exercise_id].names], seed=3)
    assert result.passed, result


# ------------------------------------------------------------------------- the watch's bypasses, one test per class


def test_turning_the_watch_off_from_a_cell_breaks_the_rule():
    """Before: `probe.Watch = NoOp` in a cell left no watch at all (3/3 on A1); the source is now judged outside."""
    only(violations("A1.masked_softmax", "import minina.assignments.probe as probe\n\nclass NoOp:\n    pass\n\n"
                                         "probe.Watch = NoOp"), "cell 100, line 1: importing minina.assignments.probe",
         "changing probe.Watch")
    only(violations("A1.attention", "import minina\nminina.assignments.probe.Watch = object"), "changing minina.")
    only(violations("A1.padding_mask", "import torch\ntorch.softmax = print"), "changing torch.softmax")
    only(violations("A1.padding_mask", "import sys\nsys.modules['minina.assignments.probe'] = None"), "sys.modules")


def test_switching_the_profile_hook_off_and_back_is_seen():
    """Before: the hook put back before the call returned hid the call in between from the watch."""
    def masked_softmax(logits):
        hook = sys.getprofile()
        sys.setprofile(None)
        try:
            return minina.masks.masked_softmax(logits)
        finally:
            sys.setprofile(hook)

    assert "sys.setprofile (it turns off the grader's watch)" in watched("A1.masked_softmax", masked_softmax,
                                                                          torch.randn(2, 3))["forbidden"]
    only(violations("A1.masked_softmax", "import sys\nhook = sys.getprofile()"), "sys.getprofile")


def test_a_thread_started_during_the_call_is_seen():
    """Before: a thread started with _thread.start_new_thread ran without the profile hook."""
    import _thread

    def masked_softmax(logits):
        done, box = threading.Event(), []
        _thread.start_new_thread(lambda: (box.append(minina.masks.masked_softmax(logits)), done.set()), ())
        done.wait(10)
        return box[0]

    reply = watched("A1.masked_softmax", masked_softmax, torch.randn(2, 3))
    assert any("a new thread" in hit for hit in reply["forbidden"]), reply["forbidden"]
    only(violations("A1.masked_softmax", "import _thread"), "importing _thread")
    only(violations("A1.masked_softmax", "import threading"), "importing threading")


def test_code_compiled_under_a_minina_file_name_is_not_minina():
    """Before: callers were exempt by co_filename.startswith(minina/scores.py); code objects now decide."""
    source = "import minina.masks\ndef masked_softmax(logits):\n    return minina.masks.masked_softmax(logits)\n"
    names = {}
    exec(compile(source, str(Path(minina.__file__).parent / "scores.py"), "exec"), names)
    reply = watched("A1.masked_softmax", names["masked_softmax"], torch.randn(2, 3))
    assert reply["forbidden"] == ["minina.masked_softmax"], reply
    only(violations("A1.masked_softmax", f"code = compile({source!r}, 'minina/scores.py', 'exec')"), "compile(...)")


def test_minina_source_reexecuted_breaks_the_rule():
    """Re-exec'd source makes new code objects that no runtime watch can tell from the student's: the rule stops it."""
    only(violations("A1.masked_softmax", "import inspect\nimport minina.masks\nnames = {}\n"
                                         "exec(inspect.getsource(minina.masks), names)"),
         "importing inspect", "exec(...)")
    only(violations("A1.masked_softmax", "import minina\nsource = open(minina.masks.__file__).read()"),
         "open(...)", "the attribute .__file__")
    only(violations("A1.masked_softmax", "import importlib\nmasks = importlib.import_module('minina.masks')"),
         "importlib.import_module")
    only(violations("A1.masked_softmax", "src = 'x = 1'\nrun = eval\nrun(src)"), "eval(...)")
    only(violations("A1.masked_softmax", "import minina\nf = getattr(minina, 'mas' + 'ks')"), "getattr(...)")


def test_aten_op_entry_points_are_seen():
    """Before: torch.ops.aten.scaled_dot_product_attention.default._op (a builtin) bypassed OpOverload.__call__."""
    op = torch.ops.aten.scaled_dot_product_attention.default._op

    def attention(q, k, v, attn_mask=None, is_causal=False):
        return op(q, k, v, attn_mask, 0.0, is_causal)

    q = torch.randn(1, 1, 3, 4)
    assert watched("A1.attention", attention, q, q, q)["forbidden"] == ["an aten scaled_dot_product op"]
    only(violations("A1.attention", "import torch\nop = torch.ops.aten.scaled_dot_product_attention.default._op"),
         "torch.ops", "the attribute ._op")


def test_autograd_engine_and_forward_mode_are_seen_in_a5():
    """Before: Variable._execution_engine.run_backward and torch.func.jacfwd ran unwatched in A5."""
    engine = torch.autograd.Variable._execution_engine

    def by_engine(p, v, grad_out):
        p, v = p.detach().requires_grad_(), v.detach().requires_grad_()
        grad_p, grad_v = engine.run_backward((p @ v,), (grad_out,), False, False, (p, v), True, False)
        return grad_v, grad_p

    def by_jacfwd(p, v, grad_out):
        jacobian = torch.func.jacfwd(lambda v: p @ v)(v)  # (bl, Ev, bs, Ev)
        return torch.einsum("ij,ijkl->kl", grad_out, jacobian), p

    p, v, grad_out = torch.rand(3, 4).softmax(-1), torch.randn(4, 2), torch.randn(3, 2)
    for function in (by_engine, by_jacfwd):
        assert watched("A5.softmax_backward", function, p, v, grad_out)["forbidden"] == [
            "autograd (backward or torch.autograd.grad)"], function.__name__
    only(violations("A5.softmax_backward", "def softmax_backward(p, v, grad_out):\n"
                                           "    return torch.func.jacfwd(lambda v: p @ v)(v), p"), "torch.func")
    only(violations("A5.softmax_backward", "from torch.autograd import forward_ad\n\n"
                                           "def softmax_backward(p, v, grad_out):\n    return forward_ad, p"),
         "torch.autograd.forward_ad")
    only(violations("A5.softmax_backward", "def softmax_backward(p, v, grad_out):\n"
                                           "    (p @ v).backward(grad_out)\n    return v.grad, p.grad"), ".backward")


def test_minina_internals_are_seen():
    """Before: minina's tile step (then in minina.compiled) and exercises._reference_with_logsumexp were not watched."""
    from minina import tiles
    from minina.assignments import exercises

    def by_internal(q, k, v, score, block_size, is_causal=False):
        return exercises._reference_with_logsumexp(q, k, v, score, is_causal)

    grad = torch.randn(2, 2)
    reply = watched("A5.mlp_backward", lambda *args: tiles._mlp_backward(grad, [], [], (1,), "relu"), grad)
    assert reply["forbidden"] == ["minina's internals"], reply
    score, q = minina.NeuralScore(4, proj_dim=2, hidden=(3,)), torch.randn(1, 1, 3, 4)
    assert watched("A4.online_attention", by_internal, q, q, q, score, 3)["forbidden"] == ["minina's internals"]
    only(violations("A5.mlp_backward", "from minina.tiles import _mlp_backward"), "importing minina.tiles.")
    only(violations("A4.online_attention", "import minina.assignments.exercises as reference"),
         "importing minina.assignments.exercises")
    only(violations("A4.online_attention", "from minina import chunked\n\n"
                                           "def online_attention(q, k, v, score, block_size, is_causal=False):\n"
                                           "    return chunked.chunked_neural_attention(q, k, v, score)"),
         "A4.online_attention uses minina.chunked")


class Lazy(torch.Tensor):
    """A tensor whose values a __torch_function__ could compute after the watch ends."""


class LazyPair(tuple):
    def __iter__(self):
        return iter((minina.masks.masked_softmax(self[0]), self[1]))


def test_lazy_outputs_do_not_cross():
    """Before: a tensor subclass or a tuple with its own __iter__ was serialized after the watch had ended."""
    x = torch.randn(2, 3)
    reply = watched("A1.masked_softmax", lambda logits: logits.as_subclass(Lazy), x)
    assert reply["error"]["type"] == "TypeError" and "Lazy, a subclass of Tensor" in reply["error"]["message"]
    reply = watched("A4.online_attention", lambda *args: LazyPair((x, x)), x)
    assert reply["error"]["type"] == "TypeError" and "LazyPair, a subclass of tuple" in reply["error"]["message"]
    assert type(watched("A1.masked_softmax", torch.softmax, x.double(), -1)["output"]) is torch.Tensor


# -------------------------------------------------------------------------------- what the rule forbids, by example


@pytest.mark.parametrize("source, words", [
    ("import minina.masks\nf = minina.masks.masked_softmax\ng = f\n\ndef masked_softmax(x):\n    return g(x)",
     "A1.masked_softmax uses minina.masks.masked_softmax"),
    ("import minina.masks\nmasked_softmax = lambda x: minina.masks.masked_softmax(x)", "minina.masks.masked_softmax"),
    ("import minina.masks\nfs = [minina.masks.masked_softmax]\n\ndef masked_softmax(x):\n    return fs[0](x)",
     "minina.masks.masked_softmax"),
    ("import minina.masks\n\ndef setup():\n    global f\n    f = minina.masks.masked_softmax\n\n"
     "def masked_softmax(x):\n    return f(x)", "minina.masks.masked_softmax"),
    ("from minina.masks import masked_softmax as m\n\ndef masked_softmax(x, f=m):\n    return f(x)",
     "minina.masks.masked_softmax"),
    ("from minina.masks import *", "from minina.masks import *"),
    ("!cat /etc/passwd", "a shell escape"), ("%%bash\nls", "a shell escape"), ("%run other.py", "a shell escape"),
    ("g = globals()", "globals(...)"), ("b = __builtins__", "the name __builtins__"),
    ("import torch\nt = torch._C", "the attribute ._C"), ("import os\nos.system('ls')", "os.system"),
    ("import ctypes", "importing ctypes"), ("import subprocess", "importing subprocess"),
    ("import string", "importing string"), ("import unittest.mock", "importing unittest.mock"),
    ("def masked_softmax(x):\n    import minina.masks as m\n    return m.masked_softmax(x)",
     "A1.masked_softmax uses minina.masks.masked_softmax"),
    ("def masked_softmax(x):\n    return next(iter([x])).gi_frame.f_back", "the frame or code attribute .f_back"),
    ("from torch.nn.attention.flex_attention import flex_attention as masked_softmax", "uses torch.nn.attention"),
    ("import torch\n\ndef masked_softmax(x):\n    return torch.jit.CompilationUnit('def f(x): return x').f(x)",
     "A1.masked_softmax uses torch.jit"),
])
def test_the_rule_names_the_construct(source, words):
    messages = only(violations("A1.masked_softmax", source), words)
    assert all(message.startswith(("cell ", "A1.")) for message in messages)


def test_a_score_split_is_told_from_a_tensor_split():
    for source in ("def split_first_layer(q, k, score):\n    return score.split(q, k)[:2]",
                   "def split_first_layer(q, k, score):\n    s = score\n    return s.split(q, k)[:2]",
                   "def split_first_layer(q, k, score):\n    return type(score).split(score, q, k)[:2]",
                   "def split_first_layer(q, k, score):\n    return getattr(score, 'split')(q, k)[:2]",
                   "def halves(s, q, k):\n    return s.split(q, k)\n\n"
                   "def split_first_layer(q, k, score):\n    return halves(score, q, k)[:2]"):
        only(violations("A4.split_first_layer", source), "NeuralScore.split")
    only(violations("A2.pair_logits", "def pair_logits(q, k, score):\n    return score.logits(q, k)"), ".logits")


def test_not_implemented_deep_in_torch_is_a_failure_not_a_stub():
    def masked_softmax(logits):
        return torch.nn.Module()(logits)  # torch raises NotImplementedError: no forward

    result = run_exercise("A1.masked_softmax", [masked_softmax])
    assert result.status == "failed" and "NotImplementedError" in result.message, result
    names = namespace(FOLDER / "a1_masked_attention.ipynb")  # the student notebook's own stub
    assert run_exercise("A1.masked_softmax", [names["masked_softmax"]]).status == "not attempted"

    def elsewhere(logits):
        raise NotImplementedError("not yet")

    assert run_exercise("A1.masked_softmax", [elsewhere]).status == "failed"


def test_rule_runs_without_triton(tmp_path):
    # an instructor on macOS or Windows grades with --unsafe: the rule must not need minina.triton_kernels there
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["triton"] = None  # as if not installed\n')
    program = ("from minina.assignments import EXERCISES\nfrom minina.assignments.rules import source_violations\n"
               "cells = [(0, 'from minina.masks import masked_softmax as f\\ndef masked_softmax(x):\\n    return f(x)')]\n"
               "print(source_violations(cells, EXERCISES['A1.masked_softmax']))")
    result = subprocess.run([sys.executable, "-c", program], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "minina.masks.masked_softmax" in result.stdout, result.stdout


def test_every_forbid_target_exists():
    """The grader names minina's code by module and object; a rename must fail here, not silently disarm a check."""
    import importlib.util

    from minina.assignments import probe, rules

    for name in (*rules.INTERNALS, *probe._INTERNALS):
        assert importlib.util.find_spec(name) is not None, f"{name} is gone: the grader would not watch it"
    objects, codes, builtins = rules._forbidden_objects(), probe._codes(), probe._builtins()
    assert set(objects) == set(probe.FORBIDDABLE) == set(codes) | set(builtins)
    judged_by_attribute = {*rules.FORBIDDEN_ATTRIBUTES, "NeuralScore.split"}  # split: _part_violation's receiver test
    for label in probe.FORBIDDABLE:
        assert objects[label] or label in judged_by_attribute or label == "minina.triton_kernels", label
        assert codes.get(label) or builtins.get(label) or label == "minina.triton_kernels", label
