"""dot_product_attention and neural_attention against independent references, gradients and error paths."""
import math

import pytest
import torch
import torch.nn.functional as F

import minina
from minina import NeuralScore, dot_product_attention, neural_attention


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
    torch.testing.assert_close(dot_product_attention(q, k, v, mask, is_causal, scale), expected)


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
    assert torch.autograd.gradcheck(lambda q, k, v: dot_product_attention(q, k, v, mask, True), (q, k, v))
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


@pytest.mark.parametrize("fn", ["dot", "neural"])
def test_fully_masked_row_gives_zeros_and_finite_grads(fn):
    q, k, v = (torch.randn(2, n, 4, requires_grad=True) for n in (3, 5, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    score = NeuralScore(4)
    out = dot_product_attention(q, k, v, mask) if fn == "dot" else neural_attention(q, k, v, score, mask)
    assert torch.equal(out[:, 1], torch.zeros(2, 4))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    float_mask = torch.zeros(3, 5).masked_fill(~mask, -math.inf)
    assert torch.equal(dot_product_attention(q, k, v, float_mask)[:, 1], torch.zeros(2, 4))


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


@pytest.mark.parametrize("fn", ["dot", "neural"])
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(4), torch.randn(5, 4), torch.randn(5, 4)), ValueError, r"q must have shape.*\(4,\)"),
    ((torch.randn(3, 4), torch.randn(5, 6), torch.randn(5, 4)), ValueError, r"feature size.*\(3, 4\).*\(5, 6\)"),
    ((torch.randn(3, 4), torch.randn(5, 4), torch.randn(6, 4)), ValueError, r"key length.*\(5, 4\).*\(6, 4\)"),
    ((torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.randn(3, 5, 4)), ValueError, "do not broadcast"),
    (([[1.0]], torch.randn(5, 4), torch.randn(5, 4)), TypeError, "q must be a torch.Tensor"),
])
def test_bad_inputs(fn, args, error, match):
    with pytest.raises(error, match=match):
        if fn == "dot":
            dot_product_attention(*args)
        else:
            neural_attention(*args, NeuralScore(4))


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
