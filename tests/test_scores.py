"""NeuralScore's options do what they claim, and the defaults stay the paper's."""
import copy
import os

import pytest
import torch
import torch.nn as nn

import minina
from minina import neural_attention
from minina.attention import BACKENDS
from minina.scores import RELIABLE_SCORE_OPTIONS, NeuralScore
from minina.tools.study import CANDIDATES


def paper_layers(head_dim, proj_dim):
    """Independent reference: the paper's layers built by hand in NeuralScore's order, PyTorch's default init."""
    q_proj, k_proj = nn.Linear(head_dim, proj_dim), nn.Linear(head_dim, proj_dim)
    mlp = [nn.Linear(2 * proj_dim, proj_dim), nn.Linear(proj_dim, proj_dim // 2), nn.Linear(proj_dim // 2, 1)]
    return q_proj, k_proj, mlp


def pair_logits(score, q, k, scale=1.0):
    """Independent reference: score every pair with the MLP written out, times an output scale."""
    a, b = score.q_proj(q), score.k_proj(k)  # (L, P), (S, P)
    x = torch.cat([a[:, None].expand(-1, k.shape[0], -1), b[None].expand(q.shape[0], -1, -1)], -1)  # (L, S, 2P)
    first, *rest = score.linears()
    x = first(x)
    for layer in rest:
        x = layer(torch.relu(x))
    return x.squeeze(-1) * scale  # (L, S)


def split_logits(score, q, k):
    """Rebuild the logits from split(), as a backend that never builds the pair tensor would."""
    A, Bk, rest = score.split(q, k)  # (L, h1), (S, h1), [(weight, bias), ...]
    x = A[:, None, :] + Bk[None, :, :]  # (L, S, h1)
    for weight, bias in rest:
        x = torch.relu(x) @ weight.T + bias
    return x.squeeze(-1)  # (L, S)


def test_default_is_the_paper_init():
    torch.manual_seed(3)
    score = NeuralScore(64, 8)
    torch.manual_seed(3)
    q_proj, k_proj, mlp = paper_layers(64, 8)
    for mine, ref in zip([score.q_proj, score.k_proj, *score.linears()], [q_proj, k_proj, *mlp]):
        assert torch.equal(mine.weight, ref.weight) and torch.equal(mine.bias, ref.bias)
    assert not score.residual and score.activation == "relu" and score.hidden == (8, 4)
    assert sorted(n for n, _ in score.named_parameters()) == sorted(
        ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "mlp.0.weight", "mlp.0.bias",
         "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias"])


def assert_split_matches_logits_and_gradients(score, scale=1.0):
    """split() rebuilds the written-out MLP's logits (times scale) and logits(), and the same gradients."""
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close(split_logits(score, q, k), pair_logits(score, q, k, scale))
    torch.testing.assert_close(split_logits(score, q, k), score.logits(q, k))
    weights = torch.randn(5, 7)
    grads_split = torch.autograd.grad((split_logits(score, q, k) * weights).sum(), list(score.parameters()))
    grads_pairs = torch.autograd.grad((score.logits(q, k) * weights).sum(), list(score.parameters()))
    for a, b in zip(grads_split, grads_pairs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("options", [{}, {"hidden": "wide"}])
def test_split_matches_logits_and_gradients(options):
    assert_split_matches_logits_and_gradients(NeuralScore(16, 4, **options))


def test_wide_hidden():
    """hidden="wide" is (P, P) with the paper's init draws."""
    torch.manual_seed(0)
    wide = NeuralScore(16, 6, hidden="wide")
    torch.manual_seed(0)
    explicit = NeuralScore(16, 6, hidden=(6, 6))
    assert wide.hidden == (6, 6) and NeuralScore(16, 6, hidden="paper").hidden == (6, 3)
    for a, b in zip(wide.parameters(), explicit.parameters()):
        assert torch.equal(a, b)


def test_residual_score_is_the_scaled_dot_product_plus_the_mlp():
    score = NeuralScore(16, 4, residual=True)
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    dot = torch.einsum("ble,bse->bls", q, k) / 4.0  # sqrt(16)
    torch.testing.assert_close(score.logits(q, k), dot)  # the MLP's last layer starts at zero
    with torch.no_grad():
        score.linears()[-1].weight.normal_()
    mlp = NeuralScore(16, 4)
    mlp.load_state_dict(score.state_dict())
    torch.testing.assert_close(score.logits(q, k), mlp.logits(q, k) + dot)
    A, Bk, rest, (q_residual, k_residual) = score.split(q, k, residual_term=True)
    torch.testing.assert_close(q_residual @ k_residual.transpose(-2, -1), dot)
    assert mlp.split(q, k, residual_term=True)[3] is None
    with pytest.raises(ValueError, match="residual=True"):
        score.split(q, k)


def test_options_pass_through_models():
    lm = minina.TransformerLM(vocab_size=11, dim=32, depth=2, heads=2, max_seq_len=8, kind="neural",
                              score_options={"hidden": "wide", "residual": True})
    scores = [m for m in lm.modules() if isinstance(m, NeuralScore)]
    assert len(scores) == 2 and all(s.hidden == (2, 2) and s.residual for s in scores)
    lm.loss(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))).backward()
    assert all(s.linears()[-1].weight.grad is not None for s in scores)


def test_reliable_options_are_a_studied_candidate_and_build_a_score():
    assert RELIABLE_SCORE_OPTIONS in [options for options in CANDIDATES.values() if options]
    score = NeuralScore(64, **RELIABLE_SCORE_OPTIONS)
    assert score.logits(torch.randn(3, 64), torch.randn(4, 64)).shape == (3, 4)


def backend_device(backend, request):
    """The device backend runs on in this session; skips the test when it cannot run here."""
    if backend == "triton":
        pytest.importorskip("triton", reason="backend='triton' needs the triton package")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run")
    if backend == "compiled":
        request.getfixturevalue("compile_works")
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def assert_matches_float64_reference(backend, score, q, k, v):
    """Causal attention on backend: output and the gradients of q, k, v and every score parameter against the
    reference backend in float64."""
    reference = copy.deepcopy(score).double()
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = neural_attention(*args, reference, is_causal=True, backend="reference")
    weight = torch.randn(expected.shape, device=q.device)
    expected_grads = torch.autograd.grad((expected * weight.double()).sum(), [*args, *reference.parameters()])
    out = neural_attention(q, k, v, score, is_causal=True, backend=backend)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v, *score.parameters()])
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_reliable_options_run_on_every_backend(backend, request):
    """The recommended score is one every backend takes: output and gradients equal the float64 reference."""
    device = backend_device(backend, request)
    score = NeuralScore(32, **RELIABLE_SCORE_OPTIONS).to(device)
    with torch.no_grad():  # the last layer starts small: make every layer matter to the gradients
        for parameter in score.parameters():
            parameter.normal_(0, 0.5)
    q, k, v = (torch.randn(2, 2, n, 32, device=device, requires_grad=True) for n in (19, 23, 23))
    assert_matches_float64_reference(backend, score, q, k, v)


def test_repr_names_the_options():
    assert "activation='relu'\n" in repr(NeuralScore(64)) and "residual" not in repr(NeuralScore(64))
    assert "hidden=(2, 2)" in repr(NeuralScore(64, hidden="wide"))
    assert "activation='gelu', residual=True" in repr(NeuralScore(64, activation="gelu", residual=True))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"hidden": "narrow"}, ValueError, "hidden must be 'paper', 'wide' or a sequence"),
    ({"activation": "tanh"}, ValueError, "activation must be one of"),
    ({"residual": 1}, TypeError, "residual must be a bool"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralScore(64, **kwargs)
