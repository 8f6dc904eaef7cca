"""The course assignments: marker stripping, build --check, the checks (each fails a plausible wrong answer and says
why; library calls fail however they are bound), the student notebooks (every exercise not attempted), the grader
(verdicts out of the notebook's reach: forged lines, patches, library calls, time limits, a sandboxed kernel,
pinning), Gradescope's results.json and autograder zip, and packaging.

nbval runs every notebook under notebooks/assignments/ (solutions assert that all their checks pass).
"""
import csv
import json
import linecache
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli, its origin
    import tomli as tomllib
import torch
from IPython.core.inputtransformer2 import TransformerManager

import minina
from minina.__main__ import main as minina_main
from minina.assignments import ASSIGNMENTS, EXERCISES, check, passed
from minina.assignments.build import ANSWER_PLACEHOLDER, MarkerError, build, render, student_notebook
from minina.assignments.checks import run_exercise
from minina.assignments.exercises import reference_mean_std, supported_conclusion
from minina.assignments.submission import gradescope_text, summary_table
from minina.masks import masked_softmax as reference_masked_softmax

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks" / "assignments"
SOLUTIONS = sorted((FOLDER / "solutions").glob("*.ipynb"))
BLOCK = re.compile(r"^\s*# BEGIN (SOLUTION|HIDDEN TESTS).*?^\s*# END (SOLUTION|HIDDEN TESTS)\s*$", re.M | re.S)
MD_BLOCK = re.compile(r"<!--\s*BEGIN SOLUTION\s*-->(.*?)<!--\s*END SOLUTION\s*-->", re.S)


def run_cell(source, namespace, name):
    """Execute a notebook cell as its kernel would, with its source findable (Triton's JIT reads it)."""
    source = TransformerManager().transform_cell(source)
    filename = f"<{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)


def scratch_masked_softmax(logits):
    """A from-scratch masked softmax, as a student writes it (minina's own is forbidden in the checks)."""
    row_max = logits.amax(dim=-1, keepdim=True)
    p = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    total = p.sum(dim=-1, keepdim=True)
    return p / torch.where(total > 0, total, torch.ones_like(total))


def scratch_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, diagonal=1, invert=False):
    """From-scratch attention; scale, diagonal (of the causal mask) and invert make the usual mistakes."""
    L, S = q.shape[-2], k.shape[-2]
    logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if attn_mask is not None:
        mask = ~attn_mask if invert and attn_mask.dtype == torch.bool else attn_mask
        logits = logits.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else logits + mask
    if is_causal:
        logits = logits.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(diagonal=diagonal), -math.inf)
    return scratch_masked_softmax(logits) @ v


def fail(exercise_id, *objects):
    result = run_exercise(exercise_id, objects, seed=0)
    assert result.status == "failed", result
    return result.message


# ---------------------------------------------------------------------------------------------- build and markers


def code(source):
    return nbformat.v4.new_code_cell(source)


def test_markers_become_stubs_and_hidden_tests_vanish():
    solution = nbformat.v4.new_notebook(cells=[
        code("def f(x):\n    y = 1\n    # BEGIN SOLUTION\n    z = x + y\n    return z\n    # END SOLUTION"),
        code('check("A9.f", f)\n# BEGIN HIDDEN TESTS\nassert passed("A9.f")\n# END HIDDEN TESTS'),
        code("answer = 42  # SOLUTION\ndef g():\n    return 7  # SOLUTION\nprint(1)  # SOLUTION"),
        code("# BEGIN HIDDEN TESTS\nassert answer == 42\n# END HIDDEN TESTS"),
        nbformat.v4.new_markdown_cell("Why?\n\n<!-- BEGIN SOLUTION -->\nBecause.\n<!-- END SOLUTION -->"),
        code("# BEGIN SOLUTION A9.h\nh = 3\n# END SOLUTION"),
    ])
    solution.cells[0].outputs = [nbformat.v4.new_output("stream", text="hi")]
    student = student_notebook(solution)
    sources = [cell.source for cell in student.cells]
    assert sources == [
        'def f(x):\n    y = 1\n    raise NotImplementedError("A9.f")',
        'check("A9.f", f)',
        "answer = ...\ndef g():\n    return ...\n...",
        f"Why?\n\n{ANSWER_PLACEHOLDER}",
        'raise NotImplementedError("A9.h")',
    ]
    assert student.cells[0].outputs == [] and solution.cells[0].outputs  # the source is not modified


@pytest.mark.parametrize("source", ["# BEGIN SOLUTION\nx = 1", "x = 1\n# END SOLUTION",
                                    "# BEGIN HIDDEN TESTS\nx = 1\n# END SOLUTION",
                                    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_unpaired_markers_are_an_error(source):
    with pytest.raises(MarkerError, match="cell 0"):
        student_notebook(nbformat.v4.new_notebook(cells=[code(source)]), "broken")


def test_build_check_passes_and_names_a_stale_notebook(tmp_path, capsys):
    assert len(SOLUTIONS) >= 6
    assert build(FOLDER, check=True) == []
    (tmp_path / "solutions").mkdir()
    source = tmp_path / "solutions" / SOLUTIONS[0].name
    source.write_text(SOLUTIONS[0].read_text(encoding="utf-8"), encoding="utf-8")
    assert "missing" in build(tmp_path, check=True)[0]
    assert build(tmp_path) == []
    target = tmp_path / SOLUTIONS[0].name
    target.write_text(target.read_text(encoding="utf-8").replace("Exercise", "Exercize"), encoding="utf-8")
    problems = build(tmp_path, check=True)
    assert len(problems) == 1 and SOLUTIONS[0].name in problems[0] and "differs" in problems[0]
    with pytest.raises(SystemExit) as exit_info:
        minina_main(["assignments", "build", "--check", "--dir", str(tmp_path)])
    assert exit_info.value.code == 1 and SOLUTIONS[0].name in capsys.readouterr().err


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_student_notebook_keeps_nothing_of_solution_blocks(path):
    solution = nbformat.read(path, as_version=4)
    student = nbformat.read(FOLDER / path.name, as_version=4)
    nbformat.validate(student)
    assert render(student_notebook(solution, path.stem)) == (FOLDER / path.name).read_text(encoding="utf-8")
    assignment = solution.metadata["minina"]["assignment"]
    assert ASSIGNMENTS[assignment][0] == path.stem and student.metadata["minina"]["assignment"] == assignment
    solution_text = "\n".join(cell.source for cell in solution.cells)
    outside = BLOCK.sub("", MD_BLOCK.sub("", solution_text)).splitlines()
    student_lines = "\n".join(cell.source for cell in student.cells).splitlines()
    hidden = [line for block in BLOCK.finditer(solution_text) for line in block.group(0).splitlines()[1:-1]]
    hidden += [line for block in MD_BLOCK.finditer(solution_text) for line in block.group(1).splitlines()]
    assert hidden
    for line in (line for line in hidden if line.strip()):
        assert student_lines.count(line) == outside.count(line), f"{line!r} leaks into the student notebook"
    assert not any(cell.get("outputs") or cell.get("execution_count") for cell in student.cells)
    stubs = re.findall(r'raise NotImplementedError\("([^"]+)"\)', "\n".join(student_lines))
    mine = sorted(e for e in EXERCISES if e.startswith(assignment + "."))
    assert set(stubs) <= set(mine) and stubs
    for exercise_id in mine:  # every exercise is checked in the notebook
        assert f'check("{exercise_id}"' in "\n".join(student_lines)


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_notebook_is_committed_executed(path):
    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0].source
    assert first.startswith("# ") and "What you will practise" in first
    assert (f"https://colab.research.google.com/github/minina-org/minina/blob/main/notebooks/assignments/"
            f"{path.name})") in first
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert 'IN_COLAB = "google.colab" in sys.modules' in code_cells[0].source
    assert '%pip install -q "minina @ git+https://github.com/minina-org/minina.git"' in code_cells[0].source
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert not any(output.output_type == "error" for cell in code_cells for output in cell.outputs)
    printed = "".join(o.get("text", "") for cell in code_cells for o in cell.outputs)
    assert ": failed" not in printed and ": not attempted" not in printed and "✓" in printed


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_student_notebook_runs_and_reports_not_attempted(path, monkeypatch, capsys):
    """Run the student version's code in this process (as its kernel would) and check every exercise's names."""
    monkeypatch.chdir(FOLDER)
    student = nbformat.read(FOLDER / path.name, as_version=4)
    namespace = {"__name__": "__main__"}
    with torch.random.fork_rng(devices=[]):
        for index, cell in enumerate(student.cells):
            if cell.cell_type == "code":
                run_cell(cell.source, namespace, f"{path.stem}-{index}")
    printed = capsys.readouterr().out
    assignment = student.metadata["minina"]["assignment"]
    for spec in (e for e in EXERCISES.values() if e.assignment == assignment):
        assert f"{spec.id}: not attempted" in printed
        result = run_exercise(spec.id, [namespace[name] for name in spec.names], seed=3)
        assert result.status == "not attempted" and result.points == 0, result
    assert ": passed" not in printed and ": failed" not in printed


# ------------------------------------------------------------------------------------- check() and its results


def test_check_prints_one_line_and_never_raises(capsys):
    check("A1.masked_softmax", scratch_masked_softmax)
    check("A1.padding_mask", lambda lengths, max_len: 1 / 0)
    check("A1.attention", lambda *args, **kwargs: (_ for _ in ()).throw(NotImplementedError("A1.attention")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "✓ A1.masked_softmax: passed"
    assert lines[1].startswith("✗ A1.padding_mask: failed: ") and "ZeroDivisionError" in lines[1]
    assert lines[2] == "· A1.attention: not attempted"
    assert passed("A1.masked_softmax") and not passed("A1.padding_mask") and not passed("A1.attention")
    assert run_exercise("A6.mean_std", [...]).status == "not attempted"
    with pytest.raises(ValueError, match="unknown exercise"):
        check("A1.nope", len)
    with pytest.raises(TypeError, match="takes 1 object"):
        check("A1.masked_softmax", len, len)


def test_check_does_not_move_the_notebook_random_stream():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    run_exercise("A1.attention", [scratch_attention])
    assert torch.equal(torch.rand(3), expected)


def test_library_calls_fail_however_they_are_bound():
    """minina's own implementation, PyTorch's fused attention and autograd are seen through any alias."""
    from torch.nn.functional import scaled_dot_product_attention as fused

    aten = torch.ops.aten.scaled_dot_product_attention
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True).double()

    def via_mha(q, k, v, attn_mask=None, is_causal=False):
        return mha(q[0], k[0], v[0])[0][None]

    def by_autograd(p, v, grad_out):
        p, v = p.detach().requires_grad_(), v.detach().requires_grad_()
        (p @ v).backward(grad_out)
        return v.grad, p.grad

    cases = [("A1.masked_softmax", reference_masked_softmax, "minina.masked_softmax"),
             ("A1.attention", minina.dot_product_attention, "minina.dot_product_attention"),
             ("A1.attention", lambda q, k, v, attn_mask=None, is_causal=False: fused(q, k, v, attn_mask=attn_mask,
                                                                                     is_causal=is_causal),
              "F.scaled_dot_product_attention"),
             ("A1.attention", lambda q, k, v, attn_mask=None, is_causal=False: aten(q, k, v), "torch.ops.aten"),
             ("A1.attention", via_mha, "nn.MultiheadAttention"),
             ("A2.pair_logits", lambda q, k, score: type(score).logits(score, q, k), "NeuralScore.logits"),
             ("A4.split_first_layer", lambda q, k, score: score.split(q, k)[:2], "NeuralScore.split"),
             ("A5.softmax_backward", by_autograd, "autograd")]
    for exercise_id, function, label in cases:
        message = fail(exercise_id, function)
        assert message.startswith(f"{exercise_id} called {label}") and "write it yourself" in message, message


def test_a4_spy_sees_the_class_method_and_the_mlp():
    def all_keys(q, k, v, score, block_size, is_causal=False):
        logits = type(score).logits(score, q, k)  # (..., L, S), past any instance attribute
        return reference_weights(logits, is_causal) @ v, torch.logsumexp(logits, dim=-1)

    def reference_weights(logits, is_causal):
        L, S = logits.shape[-2:]
        mask = torch.ones(L, S, dtype=torch.bool).tril() if is_causal else None
        return torch.softmax(logits if mask is None else logits.masked_fill(~mask, -math.inf), dim=-1)

    assert "keys at once" in fail("A4.online_attention", all_keys)


# ---------------------------------------------------------------------- one plausible wrong answer per exercise


def softmax_without_shift(logits):
    p = torch.exp(logits)
    return p / p.sum(-1, keepdim=True)


def test_wrong_masked_softmax():
    assert "around 1000" in fail("A1.masked_softmax", softmax_without_shift) and "NaN" in fail(
        "A1.masked_softmax", softmax_without_shift)
    assert "all -inf" in fail("A1.masked_softmax", lambda x: torch.softmax(x, dim=-1))
    assert "not exactly 0" in fail("A1.masked_softmax", lambda x: scratch_masked_softmax(x.clamp(min=-30)))
    message = fail("A1.masked_softmax", lambda x: torch.softmax(x, dim=-1).nan_to_num())  # NaN gradient
    assert "gradient" in message and "NaN" in message
    message = fail("A1.masked_softmax", lambda x: torch.softmax(x, dim=0))
    assert "(3, 7)" in message and "your output equals a softmax over dimension 0 instead of the last" in message
    message = fail("A1.masked_softmax", lambda x: torch.softmax(x.clamp(min=-1e9), dim=-1))  # -inf made finite
    assert "all -inf" in message and "equals a softmax that gives a row of all -inf logits uniform weights" in message
    assert run_exercise("A1.masked_softmax", [scratch_masked_softmax], seed=4).passed


def test_wrong_attention_is_diagnosed():
    def mistake(**options):
        return lambda q, k, v, attn_mask=None, is_causal=False: scratch_attention(q, k, v, attn_mask, is_causal,
                                                                                   **options)

    message = fail("A1.attention", mistake(scale=1.0))
    assert "no mask" in message and "off by" in message and "equals attention without the 1/sqrt(E)" in message
    assert "equals attention with the causal mask shifted by one: one key too few" in fail(
        "A1.attention", mistake(diagonal=0))
    assert "shifted by one: one key too many" in fail("A1.attention", mistake(diagonal=2))
    assert "boolean mask inverted" in fail("A1.attention", mistake(invert=True))
    assert "ignores is_causal" in fail("A1.attention", lambda q, k, v, attn_mask=None, is_causal=False:
                                       scratch_attention(q, k, v, attn_mask))
    assert run_exercise("A1.attention", [scratch_attention], seed=4).passed


def test_wrong_padding_mask():
    message = fail("A1.padding_mask", lambda lengths, S: (torch.arange(S) <= lengths[:, None])[:, None, None, :])
    assert "lengths" in message and "should be False" in message and "equals a mask one token too long" in message
    message = fail("A1.padding_mask", lambda lengths, S: (torch.arange(S) >= lengths[:, None])[:, None, None, :])
    assert "equals the mask inverted" in message
    message = fail("A1.padding_mask", lambda lengths, S: (torch.arange(S) < lengths[:, None] - 1)[:, None, None, :])
    assert "equals a mask one token too short" in message


def test_wrong_pair_logits():
    def loops(q, k, score):
        rows = [[score.mlp(torch.cat([score.q_proj(q[..., i, :]), score.k_proj(k[..., j, :])], -1))[..., 0]
                 for j in range(k.shape[-2])] for i in range(q.shape[-2])]
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    def swapped(q, k, score):
        return own_pair_logits(k, q, score).transpose(-2, -1)

    def own_pair_logits(q, k, score):
        a, b = score.q_proj(q), score.k_proj(k)  # (B, H, L, P), (B, H, S, P)
        L, S, P = a.shape[-2], b.shape[-2], a.shape[-1]
        pairs = torch.cat([a.unsqueeze(-2).expand(*a.shape[:-2], L, S, P),
                           b.unsqueeze(-3).expand(*b.shape[:-2], L, S, P)], dim=-1)  # (B, H, L, S, 2P)
        return score.mlp(pairs).squeeze(-1)

    def key_first(q, k, score):
        a, b = score.q_proj(q), score.k_proj(k)  # (B, H, L, P), (B, H, S, P)
        L, S, P = a.shape[-2], b.shape[-2], a.shape[-1]
        pairs = torch.cat([b.unsqueeze(-3).expand(*b.shape[:-2], L, S, P),
                           a.unsqueeze(-2).expand(*a.shape[:-2], L, S, P)], dim=-1)  # (B, H, L, S, 2P)
        return score.mlp(pairs).squeeze(-1)

    def linear_only(q, k, score):
        a, b = score.q_proj(q), score.k_proj(k)
        L, S, P = a.shape[-2], b.shape[-2], a.shape[-1]
        x = torch.cat([a.unsqueeze(-2).expand(*a.shape[:-2], L, S, P),
                       b.unsqueeze(-3).expand(*b.shape[:-2], L, S, P)], dim=-1)
        for layer in score.linears():
            x = layer(x)
        return x.squeeze(-1)

    assert "without Python loops" in fail("A2.pair_logits", loops)
    assert "equals the pair MLP with the projections swapped" in fail("A2.pair_logits", swapped)
    assert "equals the pair MLP on (key, query) pairs" in fail("A2.pair_logits", key_first)
    assert "equals the pair MLP without its activations" in fail("A2.pair_logits", linear_only)
    assert run_exercise("A2.pair_logits", [own_pair_logits]).passed


def test_wrong_counts():
    def no_biases(head_dim, proj_dim, hidden):
        widths = (2 * proj_dim, *hidden, 1)
        return 2 * head_dim * proj_dim + sum(a * b for a, b in zip(widths[:-1], widths[1:]))

    def multiply_adds(L, S, head_dim, proj_dim, hidden):
        widths = (2 * proj_dim, *hidden, 1)
        return (L + S) * head_dim * proj_dim + L * S * sum(a * b for a, b in zip(widths[:-1], widths[1:]))

    assert "(too few); it equals the count without the biases" in fail("A2.score_parameters", no_biases)
    assert "(too few); it equals the multiply-adds" in fail("A2.score_flops", multiply_adds)
    assert "bfloat16" in fail("A2.pair_tensor_bytes", lambda B, H, L, S, P, dtype: B * H * L * S * 2 * P * 4)
    assert "it equals the number of elements, not bytes" in fail("A2.pair_tensor_bytes",
                                                                 lambda B, H, L, S, P, dtype: B * H * L * S * 2 * P)
    assert "whole number" in fail("A2.score_flops", lambda *args: 1.5)


def scalar_score(weights):
    """A NeuralScore(1, 1, (2, 1)) with the given (q_proj, k_proj, mlp0 W, mlp0 b, mlp2 W, mlp2 b, mlp4 W)."""
    score = minina.NeuralScore(head_dim=1, proj_dim=1, hidden=(2, 1))
    with torch.no_grad():
        for parameter, value in zip([score.q_proj.weight, score.k_proj.weight, score.mlp[0].weight, score.mlp[0].bias,
                                     score.mlp[2].weight, score.mlp[2].bias, score.mlp[4].weight], weights):
            parameter.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(parameter.shape))
        for bias in (score.q_proj.bias, score.k_proj.bias, score.mlp[4].bias):
            bias.zero_()
    return score


def test_wrong_scores():
    # a score that only sees q + k behaves like a dot-product head: monotone in the key
    monotone = scalar_score([1, 1, [[1, 1], [0, 0]], [2, 0], [[1, 0]], [0], [5]])
    assert "not on the nearest key" in fail("A3.nearest_score", lambda: monotone)
    nearest = scalar_score([1, 1, [[1, -1], [-1, 1]], [0, 0], [[-1, -1]], [4], [50]])
    assert run_exercise("A3.nearest_score", [lambda: nearest]).passed
    assert "query" in fail("A3.band_score", lambda: nearest)  # the nearest key only is not the whole band
    assert "head_dim=1" in fail("A3.band_score", lambda: minina.NeuralScore(head_dim=4))


def test_wrong_split_first_layer():
    def no_bias(q, k, score):
        first, P = score.mlp[0], score.proj_dim
        return score.q_proj(q) @ first.weight[:, :P].T, score.k_proj(k) @ first.weight[:, P:].T

    message = fail("A4.split_first_layer", no_bias)
    assert "A is off" in message and "your output equals A without the first layer's bias" in message


def online(q, k, v, score, block_size, is_causal=False, rescale_acc=True, whole=False, guard=True, rescale_sum=True,
           lse="m + log l"):
    L, S = q.shape[-2], k.shape[-2]
    m = torch.full(q.shape[:-1], -math.inf, dtype=q.dtype)
    l, acc = torch.zeros_like(m), torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    all_logits = score.logits(q, k) if whole else None
    for start in range(0, S, block_size):
        cols = slice(start, min(start + block_size, S))
        s = all_logits[..., cols] if whole else score.logits(q, k[..., cols, :])
        if is_causal:
            s = s.masked_fill(torch.arange(cols.start, cols.stop) > torch.arange(L)[:, None], -math.inf)
        new = torch.maximum(m, s.amax(-1))
        safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new)) if guard else new
        p = torch.exp(s - safe[..., None])
        l = (l * torch.exp(m - safe) if rescale_sum else l) + p.sum(-1)
        acc = (acc * torch.exp(m - safe)[..., None] if rescale_acc else acc) + p @ v[..., cols, :]
        m = new
    return acc / l[..., None], {"m + log l": m + torch.log(l), "log l": torch.log(l)}[lse]


def test_wrong_online_attention():
    assert run_exercise("A4.online_attention", [online]).passed
    message = fail("A4.online_attention", lambda *a, **kw: online(*a, **kw, rescale_acc=False))
    assert "block_size 1" in message and "rescale" in message
    assert "your output equals online softmax without rescaling the accumulator" in message
    message = fail("A4.online_attention", lambda *a, **kw: online(*a, **kw, rescale_sum=False))
    assert "your output equals online softmax without rescaling the running sum" in message
    message = fail("A4.online_attention", lambda *a, **kw: online(*a, **kw, lse="log l"))
    assert "logsumexp is off" in message and "equals log(l) without the running maximum m added" in message
    assert "at once" in fail("A4.online_attention", lambda *a, **kw: online(*a, **kw, whole=True))
    message = fail("A4.online_attention", lambda *a, **kw: online(*a, **kw, guard=False))  # m' = -inf unguarded
    assert "the first 4 keys score -inf" in message and "NaN" in message


def test_wrong_tile_backward():
    def transposed_grad_v(p, v, grad_out):
        out = p @ v
        grad_logits = p * (grad_out @ v.T - (grad_out * out).sum(-1, keepdim=True))
        return grad_out.T @ p, grad_logits  # dO^T P: (Ev, bs), the transpose of dV

    def no_delta(p, v, grad_out):
        return p.T @ grad_out, p * (grad_out @ v.T)

    assert "grad_v" in fail("A5.softmax_backward", transposed_grad_v) and "transpose" in fail(
        "A5.softmax_backward", transposed_grad_v)
    message = fail("A5.softmax_backward", no_delta)
    assert "grad_logits" in message and "equals P * (dO V^T), without subtracting the row sums" in message

    def swapped_sums(A, Bk, W2, b2, W3, b3, grad_logits):  # dA summed over queries, dBk over keys
        pre1 = A[:, None, :] + Bk[None, :, :]  # (bl, bs, h1)
        pre2 = torch.relu(pre1) @ W2.T + b2  # (bl, bs, h2)
        g2 = (grad_logits[..., None] @ W3) * (pre2 > 0)  # (bl, bs, h2)
        g1 = (g2 @ W2) * (pre1 > 0)  # (bl, bs, h1)
        return {"A": g1.sum(dim=0), "Bk": g1.sum(dim=1), "W2": g2.flatten(0, 1).T @ torch.relu(pre1).flatten(0, 1),
                "b2": g2.sum(dim=(0, 1)), "W3": (grad_logits[..., None] * torch.relu(pre2)).sum(dim=(0, 1))[None],
                "b3": grad_logits.sum()[None]}

    message = fail("A5.mlp_backward", swapped_sums)
    assert "gradient of A" in message and "equals dA summed over the queries instead of the keys" in message

    def no_second_mask(A, Bk, W2, b2, W3, b3, grad_logits):  # the second ReLU's derivative left out
        pre1 = A[:, None, :] + Bk[None, :, :]  # (bl, bs, h1)
        pre2 = torch.relu(pre1) @ W2.T + b2  # (bl, bs, h2)
        g2 = grad_logits[..., None] @ W3  # (bl, bs, h2), no (pre2 > 0)
        g1 = (g2 @ W2) * (pre1 > 0)  # (bl, bs, h1)
        return {"A": g1.sum(dim=1), "Bk": g1.sum(dim=0), "W2": g2.flatten(0, 1).T @ torch.relu(pre1).flatten(0, 1),
                "b2": g2.sum(dim=(0, 1)), "W3": (grad_logits[..., None] * torch.relu(pre2)).sum(dim=(0, 1))[None],
                "b3": grad_logits.sum()[None]}

    assert "equals the gradient without the second ReLU's derivative" in fail("A5.mlp_backward", no_second_mask)
    assert "keys" in fail("A5.mlp_backward", lambda *args: {"A": args[0]})


def test_wrong_experiment_pieces():
    generator = torch.Generator().manual_seed(0)

    def unseeded(kind, seed, steps=100):
        return 2.5 + torch.rand((), generator=generator).item()

    assert "seed" in fail("A6.train_one", unseeded)
    def population_std(values):
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / len(values))

    assert "n - 1" in fail("A6.mean_std", population_std)
    message = fail("A6.conclude", lambda s, c: "dot is better" if s["dot"][0] < s["hybrid"][0] else "hybrid is better")
    assert "support" in message and "your answers so far follow the means alone" in message
    flip = {"dot is better": "hybrid is better", "hybrid is better": "dot is better"}
    message = fail("A6.conclude", lambda s, c: flip.get(supported_conclusion(s, c), "no clear difference"))
    assert "follow the rule with higher loss taken as better" in message


def test_wrong_report():
    def train_one(kind, seed, steps=100):
        return 2.5 + 0.01 * seed + 0.1 * (kind == "hybrid")

    results = {kind: {seed: train_one(kind, seed) for seed in range(3)} for kind in ("dot", "hybrid")}
    summary = {kind: reference_mean_std(list(r.values())) for kind, r in results.items()}
    assert run_exercise("A6.report", [results, summary, "dot is better", train_one]).passed
    assert "not what your numbers support" in fail("A6.report", results, summary, "no clear difference", train_one)
    population = {kind: (m, s * math.sqrt(2 / 3)) for kind, (m, s) in summary.items()}
    assert "per-seed values" in fail("A6.report", results, population, "dot is better", train_one)
    tampered = {kind: {seed: loss - 0.05 for seed, loss in r.items()} for kind, r in results.items()}
    summary2 = {kind: reference_mean_std(list(r.values())) for kind, r in tampered.items()}
    assert "re-running" in fail("A6.report", tampered, summary2, "dot is better", train_one)
    two = {kind: dict(list(r.items())[:2]) for kind, r in results.items()}
    assert "at least 3 seeds" in fail("A6.report", two, summary, "dot is better", train_one)
    assert run_exercise("A6.report", [None, None, None, train_one]).status == "not attempted"


def test_wrong_triton_kernel():
    """The solution's kernel with the accumulator no longer rescaled: right with one key block, wrong with several."""
    cells = nbformat.read(FOLDER / "solutions" / "a7_triton_forward.ipynb", as_version=4).cells
    sources = [cell.source for cell in cells if cell.cell_type == "code"][1:]
    kernel = next(source for source in sources if "@triton.jit" in source)
    launcher = next(source for source in sources if "def triton_attention" in source)
    right = "acc = acc * alpha[:, None] + tl.dot(p, v)"
    assert right in kernel
    namespace = {"__name__": "__main__"}
    run_cell(sources[0], namespace, "a7-imports")
    run_cell(kernel.replace(right, "acc = acc + tl.dot(p, v)"), namespace, "a7-wrong-kernel")
    run_cell(launcher, namespace, "a7-launcher")
    message = fail("A7.triton_attention", namespace["triton_attention"])
    assert "BLOCK_N 16" in message and "rescale" in message
    assert "equals online softmax without rescaling the accumulator" in message
    unmasked = 's = tl.where(cols[None, :] < S, s, float("-inf"))'
    assert unmasked in kernel
    run_cell(kernel.replace(unmasked, "pass"), namespace, "a7-unmasked-kernel")
    run_cell(launcher, namespace, "a7-launcher")
    message = fail("A7.triton_attention", namespace["triton_attention"])
    assert "BLOCK_N 64" in message and "equals attention that lets the keys past the end" in message


# ------------------------------------------------------------------------------------------------------ grader


def grade_cli(*args, cwd, timeout=600):
    result = subprocess.run([sys.executable, "-m", "minina", "assignments", "grade", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def with_cells(base, *sources, at=None):
    """The notebook base (a path) with code cells appended (or inserted at index `at`)."""
    notebook = nbformat.read(base, as_version=4)
    cells = [nbformat.v4.new_code_cell(source) for source in sources]
    notebook.cells[len(notebook.cells) if at is None else at:len(notebook.cells) if at is None else at] = cells
    return notebook


FORGE = r"""
import sys, minina
import minina.assignments.checks as checks
from minina.assignments.checks import Result
checks.run_exercise = lambda exercise_id, *args, **kwargs: Result(exercise_id, "passed", points=100, max_points=1)
checks.Handle.reply = lambda self, *args, **kwargs: {"output": None, "error": None, "forbidden": [], "observed": {}}
print('MININA-GRADE {"exercise": "A1.attention", "status": "passed", "points": 100, "max_points": 1, "message": ""}')
attention = minina.dot_product_attention  # bound before the check

def masked_softmax(logits):
    print('MININA-GRADE {"status": "passed", "points": 100}')
    frame = sys._getframe(1)
    while frame:  # the checker's expected value, if it were in this process
        if "expected" in frame.f_locals:
            return frame.f_locals["expected"]
        frame = frame.f_back
    raise ValueError("no expected value in sight")
"""

ALIASES = r"""
from minina import masks as _masks
from torch.nn.functional import scaled_dot_product_attention as fused
softmax_of_minina = _masks.masked_softmax

def masked_softmax(logits):
    return softmax_of_minina(logits)

def attention(q, k, v, attn_mask=None, is_causal=False):
    return fused(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

def padding_mask(lengths, max_len):  # honest: this one earns its point
    return (torch.arange(max_len) < lengths[:, None])[:, None, None, :]
"""

WATCH_OFF = r"""
import minina.assignments.probe as probe
from minina.masks import masked_softmax


class NoOp:
    def __init__(self, *args, **kwargs):
        self.hits, self.widths = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


probe.Watch = NoOp
"""

STUBBORN = "while True:\n    try:\n        time.sleep(0.05)\n    except KeyboardInterrupt:\n        pass"

LIBRARY = {  # assignment -> a cell that solves its central exercises with one library call
    "A2": "def pair_logits(q, k, score):\n    return type(score).logits(score, q, k)",
    "A4": "def split_first_layer(q, k, score):\n    return [score][0].split(q, k)[:2]  # past the source rule\n\n"
          "def online_attention(q, k, v, score, block_size, is_causal=False):\n"
          "    logits = type(score).logits(score, q, k)  # every key at once\n"
          "    if is_causal:\n"
          "        logits = logits.masked_fill(torch.ones(logits.shape[-2:], dtype=torch.bool).triu(1), -math.inf)\n"
          "    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)",
    "A5": "def softmax_backward(p, v, grad_out):  # autograd, not by hand\n"
          "    p, v = p.detach().requires_grad_(), v.detach().requires_grad_()\n"
          "    (p @ v).backward(grad_out)\n"
          "    return v.grad, p.grad",
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory, sandbox):
    """One grader run (seed 7, 8 s limits) over submissions of every kind; rows by submission folder."""
    tmp = tmp_path_factory.mktemp("grader")
    a1 = ASSIGNMENTS["A1"][0] + ".ipynb"
    broken = nbformat.read(FOLDER / a1, as_version=4)
    for cell in broken.cells:  # a syntax error where each function is defined, and an endless loop
        if "raise NotImplementedError" in cell.source:
            cell.source = "def oops(:\n    pass"
    broken.cells.insert(3, nbformat.v4.new_code_cell("while True:\n    pass"))
    submissions = {"solution": {a1: nbformat.read(FOLDER / "solutions" / a1, as_version=4)},
                   "student": {a1: nbformat.read(FOLDER / a1, as_version=4)}, "broken": {a1: broken},
                   "forge": {a1: with_cells(FOLDER / a1, FORGE)}, "aliases": {a1: with_cells(FOLDER / a1, ALIASES)},
                   "watch_off": {a1: with_cells(FOLDER / a1, WATCH_OFF)},
                   "stubborn": {a1: with_cells(FOLDER / "solutions" / a1, "import time\n" + STUBBORN, at=3)},
                   "library": {ASSIGNMENTS[a][0] + ".ipynb": with_cells(FOLDER / (ASSIGNMENTS[a][0] + ".ipynb"), cell)
                               for a, cell in LIBRARY.items()}}
    submissions["library"]["a5_tile_backward.ipynb"] = with_cells(FOLDER / "solutions" / "a5_tile_backward.ipynb",
                                                                  LIBRARY["A5"])  # mlp_backward by hand: 1 of 2
    for kind, notebooks in submissions.items():
        (tmp / kind).mkdir()
        for name, notebook in notebooks.items():
            nbformat.write(notebook, tmp / kind / name)
    out = tmp / "grades.csv"
    start = time.monotonic()
    result = grade_cli(*(tmp / kind for kind in submissions), "--out", out, "--seed", 7, "--timeout", 8, cwd=tmp)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    by_kind = {kind: [row for row in rows if f"/{kind}/" in row["notebook"]] for kind in submissions}
    return by_kind, rows, result.stdout, time.monotonic() - start


def points(rows):
    return sum(float(row["points"]) for row in rows), sum(float(row["max_points"]) for row in rows)


def test_grader_full_zero_and_error_rows(graded):
    by_kind, rows, stdout, _ = graded
    assert list(rows[0]) == ["notebook", "assignment", "exercise", "status", "points", "max_points", "message"]
    exercises = sorted(e for e in EXERCISES if e.startswith("A1."))
    for kind, status in (("solution", "passed"), ("student", "not attempted"), ("broken", "error")):
        assert sorted(row["exercise"] for row in by_kind[kind]) == exercises
        assert {row["status"] for row in by_kind[kind]} == {status}, by_kind[kind]
        assert all(row["assignment"] == "A1" for row in by_kind[kind])
    assert points(by_kind["solution"]) == (3, 3) and points(by_kind["student"]) == (0, 3)
    assert all("not defined" in row["message"] and "SyntaxError" in row["message"] for row in by_kind["broken"])
    assert "3/3" in stdout and "0/3" in stdout


def test_forged_lines_patches_and_frames_score_nothing(graded):
    rows = {row["exercise"]: row for row in graded[0]["forge"]}
    assert points(rows.values()) == (0, 3), rows
    for row in rows.values():  # the source rule, judged in the grader, fails the notebook's attempted exercises
        assert row["status"] == "failed", row
        assert "importing minina.assignments.checks is not allowed in graded code" in row["message"]
    assert "changing checks.run_exercise" in rows["A1.masked_softmax"]["message"]


def test_turning_the_watch_off_scores_nothing(graded):
    rows = {row["exercise"]: row for row in graded[0]["watch_off"]}
    assert points(rows.values()) == (0, 3), rows
    assert rows["A1.masked_softmax"]["status"] == "failed"
    assert "importing minina.assignments.probe" in rows["A1.masked_softmax"]["message"]


def test_library_calls_score_nothing_and_honest_work_scores_exactly(graded):
    rows = {row["exercise"]: row for row in graded[0]["aliases"] + graded[0]["library"]}
    assert points(graded[0]["aliases"]) == (1, 3) and rows["A1.padding_mask"]["status"] == "passed"
    for exercise_id, words in (("A1.masked_softmax", "uses minina.masks.masked_softmax"),  # the source rule
                               ("A1.attention", "uses torch.nn.functional.scaled_dot_product_attention"),
                               ("A2.pair_logits", "uses .logits"), ("A5.softmax_backward", "uses .backward"),
                               ("A4.split_first_layer", "called NeuralScore.split")):  # the watch, second line
        assert rows[exercise_id]["status"] == "failed" and float(rows[exercise_id]["points"]) == 0
        assert f"{exercise_id} {words}" in rows[exercise_id]["message"], rows[exercise_id]
    assert "keys at once" in rows["A4.online_attention"]["message"]
    assert rows["A5.mlp_backward"]["status"] == "passed" and points(graded[0]["library"]) == (1, 8)


def test_a_kernel_that_ignores_interrupts_is_stopped(graded):
    rows = graded[0]["stubborn"]
    assert {row["status"] for row in rows} == {"error"} and points(rows) == (0, 3)
    assert all("ran longer than 8 s and ignored the interrupt, the kernel was stopped while running cell 3 "
               "(import time)" in row["message"] for row in rows), rows
    assert graded[3] < 150  # one stuck cell costs its limit and the interrupt's grace, not every later cell's


def test_notebook_time_limit_kills_the_kernel(tmp_path, sandbox):
    a1 = ASSIGNMENTS["A1"][0] + ".ipynb"
    nbformat.write(with_cells(FOLDER / "solutions" / a1, *["import time\ntime.sleep(3)"] * 4, at=3), tmp_path / a1)
    grade_cli(tmp_path, "--out", tmp_path / "grades.csv", "--timeout", 5, "--notebook-timeout", 8, cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / "grades.csv").open(encoding="utf-8")))
    assert {row["status"] for row in rows} == {"error"} and len(rows) == 3
    assert all("ran longer than 8 s (the notebook's time limit)" in row["message"] and "(import time)"
               in row["message"] for row in rows), rows


def test_a_sandboxed_kernel_cannot_forge_the_output_or_kill_the_grader(tmp_path, sandbox):
    a1 = ASSIGNMENTS["A1"][0] + ".ipynb"
    attack = ("import os, signal, json\n"
              "arguments = open(f'/proc/{os.getppid()}/cmdline').read().split('\\0')\n"
              "out = arguments[arguments.index('--out') + 1]\n"
              "for action in (lambda: open(out, 'w').write(json.dumps({'score': 300})),\n"
              "               lambda: os.kill(os.getppid(), signal.SIGKILL),\n"
              "               lambda: open('/etc/shadow').read()):\n"
              "    try:\n        action()\n        print('ATTACK SUCCEEDED')\n"
              "    except OSError as error:\n        print('refused:', error)")
    nbformat.write(with_cells(FOLDER / a1, attack), tmp_path / a1)
    out = tmp_path / "results.json"
    grade_cli(tmp_path, "--out", out, "--format", "gradescope", cwd=tmp_path)
    results = json.loads(out.read_text())
    assert results["score"] == 0 and len(results["tests"]) == 3


def test_gradescope_results_and_summary():
    rows = [dict(notebook="a.ipynb", assignment="A1", exercise="A1.attention", status="passed", points=1,
                 max_points=1, message=""),
            dict(notebook="a.ipynb", assignment="A1", exercise="A1.padding_mask", status="failed", points=0,
                 max_points=1, message="lengths [3], max_len 6: mask is off"),
            dict(notebook="b.ipynb", assignment="", exercise="", status="ignored", points=0, max_points=0,
                 message="not graded: a.ipynb is graded as A1")]
    results = json.loads(gradescope_text(rows, 12.34, "a.ipynb graded as A1: 1/2 points", "after_due_date"))
    assert set(results) == {"score", "execution_time", "output", "output_format", "visibility", "tests"}
    assert results["score"] == 1 and results["execution_time"] == 12.3
    assert results["output"] == "a.ipynb graded as A1: 1/2 points\nb.ipynb: not graded: a.ipynb is graded as A1"
    assert results["tests"] == [
        {"name": "A1.attention", "number": "1.1", "score": 1, "max_score": 1, "status": "passed", "output": "passed",
         "output_format": "text", "visibility": "after_due_date"},
        {"name": "A1.padding_mask", "number": "1.2", "score": 0, "max_score": 1, "status": "failed",
         "output": "failed: lengths [3], max_len 6: mask is off", "output_format": "text",
         "visibility": "after_due_date"}]
    assert "1/2" in summary_table(rows) and "ignored" in summary_table(rows)
    with pytest.raises(ValueError, match="visibility"):
        gradescope_text(rows, 1, visibility="later")


def test_grader_error_rows_for_unreadable_notebooks(tmp_path):
    from minina.assignments.grade import grade
    (tmp_path / "a2_neural_score.ipynb").write_text("{not json", encoding="utf-8")
    (tmp_path / "mystery.ipynb").write_text(render(nbformat.v4.new_notebook()), encoding="utf-8")
    rows = grade([tmp_path], tmp_path / "grades.csv")
    a2 = [row for row in rows if row["assignment"] == "A2"]
    assert len(a2) == 4 and {row["status"] for row in a2} == {"error"} and "readable" in a2[0]["message"]
    assert [row["status"] for row in rows if "mystery" in row["notebook"]] == ["error"]


def test_one_notebook_per_assignment_and_pinning(tmp_path):
    from minina.assignments.submission import plan

    a1, a4 = ASSIGNMENTS["A1"][0] + ".ipynb", ASSIGNMENTS["A4"][0] + ".ipynb"
    for name in ("a1.ipynb", "a1 (1).ipynb", a1):
        (tmp_path / name).write_text((FOLDER / a1).read_text(encoding="utf-8"), encoding="utf-8")
    graded, ignored, unknown = plan([tmp_path])
    assert [(p.name, a) for p, a, _ in graded] == [(a1, "A1")] and len(ignored) == 2 and not unknown
    (tmp_path / a1).unlink()
    (tmp_path / "a1.ipynb").rename(tmp_path / a4)  # an A1 notebook handed in under A4's name
    graded, ignored, _ = plan([tmp_path], pinned="A4")
    assert [(p.name, a) for p, a, _ in graded] == [(a4, "A4")] and "says it is A1, graded as A4" in graded[0][2]
    (tmp_path / "empty").mkdir()
    assert plan([tmp_path / "empty"], pinned="A1") == ([], [], [])


def check_results_json(results):
    """The fields of Gradescope's autograder specification, with their types."""
    assert isinstance(results["score"], (int, float)) and isinstance(results["execution_time"], (int, float))
    assert isinstance(results["output"], str) and results["visibility"] in ("visible", "hidden", "after_due_date",
                                                                            "after_published")
    for test in results["tests"]:
        assert set(test) == {"name", "number", "score", "max_score", "status", "output", "output_format",
                             "visibility"}
        assert test["status"] in ("passed", "failed") and 0 <= test["score"] <= test["max_score"]
    assert results["score"] == sum(test["score"] for test in results["tests"])


def test_gradescope_autograder_zip_end_to_end(tmp_path):
    """Build the zip, install its wheel, and run run_autograder in trees laid out as Gradescope's."""
    import zipfile

    archive, private = tmp_path / "autograder.zip", tmp_path / "private_checks.py"
    readme = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")  # the teaching guide's private checks
    private.write_text(re.search(r"```python\n(# private_checks.py\n.*?)```", readme, re.S)[1], encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "minina", "assignments", "autograder", "A1", "--out", archive,
                             "--timeout", "30", "--seed", "3", "--visibility", "after_due_date", "--extra-checks",
                             private], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    source = tmp_path / "source"
    zipfile.ZipFile(archive).extractall(source)
    names = sorted(path.name for path in source.iterdir())
    assert names[:1] == ["minina-" + minina.__version__ + "-py3-none-any.whl"]
    assert names[1:] == ["private_checks.py", "run_autograder", "setup.sh"]
    assert "--assignment A1 --seed 3 --timeout 30" in (source / "run_autograder").read_text()
    site = Path(tempfile.mkdtemp())  # the installed wheel, on the sandboxed kernel's PYTHONPATH, as on Gradescope
    site.chmod(0o755)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, source / names[0]],
                   check=True, timeout=300)
    a1, a4 = ASSIGNMENTS["A1"][0] + ".ipynb", ASSIGNMENTS["A4"][0] + ".ipynb"
    submissions = {"solution": {a1: FOLDER / "solutions" / a1},
                   "duplicates": {a1: FOLDER / a1, "a1 (1).ipynb": FOLDER / "solutions" / a1},
                   "renamed": {a4: FOLDER / "solutions" / a4}, "empty": {}}
    env = dict(os.environ, PYTHONPATH=str(site),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    results = {}
    for kind, files in submissions.items():
        root = tmp_path / kind  # Gradescope's layout: source/ (the zip), submission/, results/
        shutil.copytree(source, root / "source")
        (root / "submission").mkdir()
        for name, path in files.items():
            (root / "submission" / name).write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        run = subprocess.run(["bash", root / "source" / "run_autograder"], env=dict(env, AUTOGRADER_ROOT=str(root)),
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-2000:]
        results[kind] = json.loads((root / "results" / "results.json").read_text())
        check_results_json(results[kind])
    shutil.rmtree(site)
    assert results["solution"]["score"] == 5 and len(results["solution"]["tests"]) == 4  # 2 from the private check
    assert results["solution"]["tests"][-1]["name"] == "A1.long_sequences"
    assert all(test["visibility"] == "after_due_date" for test in results["solution"]["tests"])
    assert results["duplicates"]["score"] == 0 and len(results["duplicates"]["tests"]) == 4  # counted once
    assert "a1 (1).ipynb: not graded" in results["duplicates"]["output"]
    assert results["renamed"]["score"] == 0 and all("says it is A4, graded as A1" in test["output"]
                                                    for test in results["renamed"]["tests"])
    assert results["empty"]["score"] == 0 and "no notebook" in results["empty"]["output"]
    assert [test["max_score"] for test in results["empty"]["tests"]] == [1, 1, 1, 2]


# --------------------------------------------------------------------------------------------------- packaging


def test_the_wheel_ships_the_assignments():
    """setuptools' package finding, as the wheel build runs it on pyproject's configuration."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    if "packages" in config and isinstance(config["packages"], list):
        packages = config["packages"]
    else:
        packages = find_packages(where=str(ROOT), include=config["packages"]["find"]["include"])
    assert "minina.assignments" in packages and "minina" in packages
    assert (ROOT / "minina" / "assignments" / "__init__.py").is_file()
    core = [path for path in (ROOT / "minina").glob("*.py")]
    assert not any("assignments" in path.read_text(encoding="utf-8") for path in core if path.name != "__main__.py")


def render_forbid(forbid):
    """An exercise's forbid= as the teaching guide's table writes it: the fused and ready-made attention as
    "attention"."""
    from minina.assignments.exercises import ATTENTION_CALLS

    words = {"autograd (backward or torch.autograd.grad)": "autograd (`backward`, `torch.autograd.grad`)"}
    items = [words.get(label, f"`{label}`") for label in forbid if label not in ATTENTION_CALLS]
    return ", ".join(items + (["attention"] if set(ATTENTION_CALLS) <= set(forbid) else []))


def test_teaching_guide_lists_the_forbidden_calls_of_every_exercise():
    """The teaching guide's table of forbidden calls (docs/teaching.md) is the exercises' own forbid= declarations,
    row for row."""
    readme = (ROOT / "docs" / "teaching.md").read_text(encoding="utf-8")
    section = readme[readme.index("Forbidden calls per exercise"):]
    rows = re.findall(r"^\| ((?:A\d\.\w+(?:, )?)+) \| (.+?) \|$", section[:section.index("\n\n", section.index("|"))],
                      re.M)
    listed = {}
    for ids, calls in rows:
        for exercise_id in ids.split(", "):
            assert exercise_id not in listed, f"{exercise_id} listed twice"
            listed[exercise_id] = re.sub(r" \(and [^)]*\)$", "", calls)  # a note on what else is checked
    public = {id: spec for id, spec in EXERCISES.items() if spec.run.__module__ == "minina.assignments.exercises"}
    assert listed == {id: render_forbid(spec.forbid) for id, spec in public.items() if spec.forbid}


@pytest.mark.parametrize("assignment", ["A1", "A2", "A4", "A5"])
def test_solutions_pass_on_other_seeds(assignment):
    """The solutions' functions pass every check of their assignment whatever the seed of the inputs."""
    path = FOLDER / "solutions" / (ASSIGNMENTS[assignment][0] + ".ipynb")
    namespace = {"__name__": "__main__"}
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells[1:]):  # after the Colab set-up
        if cell.cell_type == "code" and "check(" not in cell.source and "passed(" not in cell.source:
            run_cell(cell.source, namespace, f"{path.stem}-{index}")
    for exercise_id, spec in EXERCISES.items():
        if spec.assignment == assignment and spec.run.__module__ == "minina.assignments.exercises":
            for seed in (1, 2, 3):
                result = run_exercise(exercise_id, [namespace[name] for name in spec.names], seed=seed)
                assert result.passed, (seed, result)


def test_kernel_environment_is_private(tmp_path, monkeypatch):
    """The kernel writes only into its folder and gets none of the grader's other variables (it compiles nothing
    unasked: backend="auto" never compiles)."""
    from minina.assignments.sandbox import kernel_environment

    monkeypatch.setenv("MININA_GRADER_SECRET", "42")
    monkeypatch.setenv("MININA_COMPILE", "1")  # a variable minina no longer reads: not passed on either
    env = kernel_environment(tmp_path)
    assert "MININA_COMPILE" not in env and "MININA_GRADER_SECRET" not in env and env["USER"] == "nobody"
    for name in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR"):
        assert Path(env[name]).is_relative_to(tmp_path), name
