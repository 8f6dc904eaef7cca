"""dot_product_attention and neural_attention against independent references, gradients and error paths."""
import inspect
import math
import pydoc

import pytest
import torch
import torch.nn.functional as F

import minina
from minina import NeuralScore, dot_product_attention, neural_attention, sdpa_attention


def loop_neural_attention(q, k, v, score, keep=None):
    """Independent reference: score each (i, j) pair one at a time with the MLP on [q_proj(q_i); k_proj(k_j)]."""
    L, S = q.shape[-2], k.shape[-2]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in q.shape[:-2]]).reshape(-1, q.dim() - 2):
        qi, ki, vi = q[tuple(idx)], k[tuple(idx)], v[tuple(idx)]
        for i in range(L):
            logits = []
            for j in range(S):
                pair = torch.cat([score.q_proj(qi[i]), score.k_proj(ki[j])])
                logits.append(score.mlp(pair)[0] if keep is None or keep[i, j] else torch.tensor(-math.inf))
            weights = torch.softmax(torch.stack(logits), dim=0)
            out[tuple(idx) + (i,)] = weights @ vi
    return out


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_dot_product_equals_sdpa(is_causal, mask_kind, scale):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(5, 7) > 0.3
        mask[:, 0] = True  # keep every row attending somewhere so SDPA has no NaN rows to compare
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 5, 7)
    if is_causal and mask is not None:  # SDPA takes one or the other; we combine, so compare with the combination
        causal = torch.ones(5, 7, dtype=torch.bool).tril()
        sdpa_mask = (mask & causal) if mask.dtype == torch.bool else mask.masked_fill(~causal, -math.inf)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, scale=scale)
    else:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    torch.testing.assert_close(dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale), expected)


def random_mask(kind, shape, empty_rows):
    """A bool or float mask of shape (..., L, S) whose rows empty_rows allow no key at all."""
    keep = torch.rand(shape) > 0.4
    keep[..., empty_rows, :] = False
    if kind == "bool":
        return keep
    return torch.randn(shape, dtype=torch.float64).masked_fill(~keep, -math.inf)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("lengths", [(5, 7), (7, 5)])
def test_sdpa_attention_equals_reference_with_empty_rows(is_causal, mask_kind, scale, lengths):
    """sdpa_attention is dot_product_attention to float64 rounding, output and gradients, also on rows that a mask
    (alone or with is_causal) leaves without any key, where both give exactly zero."""
    L, S = lengths
    q, k, v = (torch.randn(2, 3, n, e, dtype=torch.float64, requires_grad=True) for n, e in ((L, 8), (S, 8), (S, 4)))
    mask = None if mask_kind is None else random_mask(mask_kind, (2, 1, L, S), empty_rows=[1])
    if mask is not None and is_causal:
        mask[..., 3, :4] = False if mask_kind == "bool" else -math.inf  # empty only once combined with causal
    outputs, grads = [], []
    for attention in (dot_product_attention, sdpa_attention):
        out = attention(q, k, v, mask, is_causal=is_causal, scale=scale)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (q, k, v)))
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=1e-12)
    for sdpa_grad, reference_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(sdpa_grad, reference_grad, rtol=1e-12, atol=1e-12)
        assert torch.isfinite(sdpa_grad).all()
    if mask is not None:
        assert torch.equal(outputs[1][:, :, 1], torch.zeros(2, 3, 4, dtype=torch.float64))
        if is_causal:
            assert torch.equal(outputs[1][:, :, 3], torch.zeros(2, 3, 4, dtype=torch.float64))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sdpa_attention_never_shows_sdpa_a_row_without_keys(mask_kind, monkeypatch):
    """GPU kernels of SDPA may return NaN or garbage on a row with no key. Stand-in: an SDPA that returns NaN there;
    sdpa_attention must still give the reference's zeros and finite gradients."""
    sdpa = F.scaled_dot_product_attention

    def nan_on_empty_rows(q, k, v, attn_mask=None, **kwargs):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is None:
            return out
        allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf
        empty = ~allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
        return torch.where(empty, out * math.nan, out) if empty.any() else out  # NaN forward and backward

    monkeypatch.setattr(minina.attention.F, "scaled_dot_product_attention", nan_on_empty_rows)
    q, k, v = (torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5))
    mask = random_mask(mask_kind, (3, 5), empty_rows=[0])
    out = sdpa_attention(q, k, v, mask, is_causal=True)
    torch.testing.assert_close(out, dot_product_attention(q, k, v, mask, is_causal=True))
    out.sum().backward()
    assert torch.equal(out[:, 0], torch.zeros(2, 4, dtype=torch.float64))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sdpa_attention_broadcasts_and_handles_no_keys():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(1, 3, 5, 8), torch.randn(5, 2)
    torch.testing.assert_close(sdpa_attention(q, k, v, is_causal=True), dot_product_attention(q, k, v, is_causal=True))
    assert torch.equal(sdpa_attention(q, k[..., :0, :], v[:0]), torch.zeros(2, 3, 4, 2))


@pytest.mark.parametrize("call", [
    lambda q, s: dot_product_attention(q, q, q, None, 0.0, True),  # an SDPA call: dropout_p=0.0, is_causal=True
    lambda q, s: sdpa_attention(q, q, q, None, True),
    lambda q, s: neural_attention(q, q, q, s, None, True),
    lambda q, s: minina.attention_weights(q, q, s, None, True),
])
def test_arguments_after_attn_mask_are_keyword_only(call):
    """A plain * rejects SDPA's positional call, whose 5th argument is dropout_p (here it would be is_causal)."""
    with pytest.raises(TypeError, match=r"positional argument"):
        call(torch.randn(3, 4), NeuralScore(4))


@pytest.mark.parametrize("function, documented", [
    (dot_product_attention, "(q, k, v, attn_mask=None, *, is_causal=False, scale=None)"),
    (sdpa_attention, "(q, k, v, attn_mask=None, *, is_causal=False, scale=None)"),
    (neural_attention, "(q, k, v, score, attn_mask=None, *, is_causal=False, backend='auto')"),
    (minina.attention_weights, "(q, k, score=None, attn_mask=None, *, is_causal=False, scale=None)"),
])
def test_help_shows_the_documented_signature(function, documented):
    """help() shows a bare * after attn_mask (the README's signature)."""
    assert str(inspect.signature(function)) == documented
    assert function.__name__ + documented in pydoc.render_doc(function, renderer=pydoc.plaintext)


def test_internal_helpers_are_not_exported():
    assert not hasattr(minina, "choose_backend") and "choose_backend" not in minina.__all__
    assert all(hasattr(minina, name) for name in minina.__all__)


def test_reference_equals_pair_loop():
    score = NeuralScore(8, proj_dim=4).double()
    q, k, v = (torch.randn(2, 3, n, d, dtype=torch.float64) for n, d in ((4, 8), (5, 8), (5, 3)))
    torch.testing.assert_close(neural_attention(q, k, v, score, backend="reference"),
                               loop_neural_attention(q, k, v, score))
    keep = torch.ones(4, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(neural_attention(q, k, v, score, is_causal=True, backend="reference"),
                               loop_neural_attention(q, k, v, score, keep))


def test_paper_shapes():
    score = NeuralScore(64)
    assert score.proj_dim == 2 and score.q_proj.out_features == 2 and score.k_proj.out_features == 2
    widths = [(m.in_features, m.out_features) for m in score.linears()]
    assert widths == [(4, 2), (2, 1), (1, 1)]
    assert [type(m) for m in score.mlp][1::2] == [torch.nn.ReLU, torch.nn.ReLU]
    assert NeuralScore(256).proj_dim == 8
    assert [(m.in_features, m.out_features) for m in NeuralScore(512).linears()] == [(32, 16), (16, 8), (8, 1)]


def test_split_first_layer_matches_concatenation():
    score = NeuralScore(16, proj_dim=4, hidden=(6, 3)).double()
    q, k = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    A, Bk, rest = score.split(q, k)
    h = torch.relu(A.unsqueeze(-2) + Bk.unsqueeze(-3))  # (2, 5, 7, 6)
    for weight, bias in rest[:-1]:
        h = torch.relu(h @ weight.T + bias)
    weight, bias = rest[-1]
    torch.testing.assert_close((h @ weight.T + bias).squeeze(-1), score.logits(q, k))


def test_gradcheck_both_mechanisms():
    score = NeuralScore(4, proj_dim=2, hidden=(3, 2), activation="gelu").double()
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 4, 4))
    mask = torch.tensor([[True, False, True, True]] * 3)
    assert torch.autograd.gradcheck(lambda q, k, v: dot_product_attention(q, k, v, mask, is_causal=True), (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: sdpa_attention(q, k, v, mask, is_causal=True), (q, k, v))
    params = tuple(score.parameters())

    def f(q, k, v, *weights):
        return torch.func.functional_call(
            _NeuralAttention(score), dict(zip(["score." + n for n, _ in score.named_parameters()], weights)),
            (q, k, v, mask))

    weights = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, (q, k, v, *weights))


class _NeuralAttention(torch.nn.Module):
    def __init__(self, score):
        super().__init__()
        self.score = score

    def forward(self, q, k, v, mask):
        return neural_attention(q, k, v, self.score, attn_mask=mask, is_causal=True, backend="reference")


@pytest.mark.parametrize("fn", ["dot", "sdpa", "neural"])
def test_fully_masked_row_gives_zeros_and_finite_grads(fn):
    q, k, v = (torch.randn(2, n, 4, requires_grad=True) for n in (3, 5, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    score = NeuralScore(4)
    attention = {"dot": dot_product_attention, "sdpa": sdpa_attention}.get(fn)
    out = attention(q, k, v, mask) if attention else neural_attention(q, k, v, score, mask)
    assert torch.equal(out[:, 1], torch.zeros(2, 4))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    float_mask = torch.zeros(3, 5).masked_fill(~mask, -math.inf)
    assert torch.equal((attention or dot_product_attention)(q, k, v, float_mask)[:, 1], torch.zeros(2, 4))


def test_attention_weights_rows_sum_to_one():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    for score in (None, NeuralScore(8)):
        w = minina.attention_weights(q, k, score, is_causal=True)
        assert w.shape == (2, 4, 6)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
        assert (w.triu(diagonal=1) == 0).all()


def test_broadcast_batch_dims():
    score = NeuralScore(8)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(1, 3, 5, 8), torch.randn(5, 2)
    out = neural_attention(q, k, v, score)
    assert out.shape == (2, 3, 4, 2)
    torch.testing.assert_close(out[1], neural_attention(q[1], k[0], v, score))


@pytest.mark.parametrize("fn", ["dot", "sdpa", "neural"])
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(4), torch.randn(5, 4), torch.randn(5, 4)), ValueError, r"q must have shape.*\(4,\)"),
    ((torch.randn(3, 4), torch.randn(5, 6), torch.randn(5, 4)), ValueError, r"feature size.*\(3, 4\).*\(5, 6\)"),
    ((torch.randn(3, 4), torch.randn(5, 4), torch.randn(6, 4)), ValueError, r"key length.*\(5, 4\).*\(6, 4\)"),
    ((torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)), ValueError, "do not broadcast"),
    (([[1.0]], torch.randn(5, 4), torch.randn(5, 4)), TypeError, "q must be a torch.Tensor"),
    ((torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4)), TypeError,
     "q, k, v must share one floating dtype, got q torch.float32, k torch.float64, v torch.float32"),
    ((torch.ones(3, 4, dtype=torch.long),) * 3, TypeError, "floating dtype.*torch.int64"),
])
def test_bad_inputs(fn, args, error, match):
    with pytest.raises(error, match=match):
        if fn == "dot":
            dot_product_attention(*args)
        elif fn == "sdpa":
            sdpa_attention(*args)
        else:
            neural_attention(*args[:3], NeuralScore(4))


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(4, 5, dtype=torch.bool), ValueError, r"attn_mask of shape \(4, 5\).*\(2, 3, 5\)"),
    (torch.ones(2, 2, 3, 5, dtype=torch.bool), ValueError, "does not broadcast"),
    (torch.ones(3, 5, dtype=torch.long), TypeError, "bool.*torch.int64"),
    ([[True]], TypeError, "attn_mask must be a torch.Tensor"),
])
def test_bad_masks(mask, error, match):
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(error, match=match):
        dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(error, match=match):
        sdpa_attention(q, k, v, attn_mask=mask)
    with pytest.raises(error, match=match):
        neural_attention(q, k, v, NeuralScore(4), attn_mask=mask)


def test_bad_score_and_backend():
    q = torch.randn(3, 4)
    with pytest.raises(TypeError, match="score must be a minina.NeuralScore"):
        neural_attention(q, q, q, torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"head_dim 8.*\(3, 4\)"):
        neural_attention(q, q, q, NeuralScore(8))
    with pytest.raises(ValueError, match="backend must be one of"):
        neural_attention(q, q, q, NeuralScore(4), backend="magic")


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=0), "head_dim"), (dict(head_dim=8, proj_dim=0), "proj_dim"),
    (dict(head_dim=8, hidden=()), "hidden"), (dict(head_dim=8, hidden=(2, 0)), "hidden"),
    (dict(head_dim=8, activation="tanh"), "activation"),
])
def test_bad_score_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralScore(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_no_keys_gives_zeros(backend):
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 0, 4), torch.randn(2, 0, 5)
    assert torch.equal(neural_attention(q, k, v, NeuralScore(4), backend=backend), torch.zeros(2, 3, 5))
    assert torch.equal(dot_product_attention(q, k, v), torch.zeros(2, 3, 5))
