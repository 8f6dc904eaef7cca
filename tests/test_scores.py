"""NeuralScore's opt-in training options do what they claim, and the defaults stay the paper's."""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn

import minina
from minina import compiled, neural_attention
from minina.attention import BACKENDS
from minina.scores import RELIABLE_SCORE_OPTIONS, NeuralScore
from minina.tools.study import VARIANTS


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
    assert not hasattr(score, "logit_scale") and score.init == "paper" and not score.learn_scale
    assert sorted(n for n, _ in score.named_parameters()) == sorted(
        ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "mlp.0.weight", "mlp.0.bias",
         "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias"])


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    score = NeuralScore(64, proj_dim=512, init="kaiming")
    for layer in score.linears():
        assert torch.count_nonzero(layer.bias) == 0
    first = score.linears()[0]  # (512, 1024): enough weights for a tight estimate
    assert first.weight.mean().abs() < 0.01 * math.sqrt(2 / 1024)
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.01)
    bound = 1 / math.sqrt(1024)  # PyTorch's default is uniform on +-1/sqrt(fan_in): std bound/sqrt(3)
    paper = NeuralScore(64, proj_dim=512).linears()[0].weight
    assert paper.abs().max() <= bound and first.weight.abs().max() > 3 * bound


def test_kaiming_leaves_projections_as_the_paper():
    torch.manual_seed(5)
    kaiming = NeuralScore(32, 4, init="kaiming")
    torch.manual_seed(5)
    paper = NeuralScore(32, 4)
    assert torch.equal(kaiming.q_proj.weight, paper.q_proj.weight)
    assert torch.equal(kaiming.k_proj.bias, paper.k_proj.bias)
    assert not torch.equal(kaiming.linears()[0].weight, paper.linears()[0].weight)


@pytest.mark.parametrize("scale_init", [None, 2.5])
def test_learn_scale_multiplies_the_logit(scale_init):
    torch.manual_seed(1)
    score = NeuralScore(16, 4, learn_scale=True, scale_init=scale_init)
    torch.manual_seed(1)
    paper = NeuralScore(16, 4)
    expected_scale = 5.0 if scale_init is None else scale_init
    assert isinstance(score.logit_scale, nn.Parameter) and score.logit_scale.requires_grad
    assert score.logit_scale.item() == expected_scale
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    unscaled = pair_logits(paper, q, k)
    torch.testing.assert_close(score.logits(q, k), unscaled * expected_scale)
    score.logits(q, k).sum().backward()
    torch.testing.assert_close(score.logit_scale.grad, unscaled.sum().detach())  # d(s * f)/ds = f


@pytest.mark.parametrize("options", [{}, {"learn_scale": True}, {"init": "kaiming"},
                                     {"init": "kaiming", "learn_scale": True, "scale_init": 3.0}])
def test_split_matches_logits_and_gradients(options):
    score = NeuralScore(16, 4, **options)
    if score.learn_scale:
        with torch.no_grad():
            score.logit_scale.fill_(0.7)  # away from the initial value, so a missing fold would show
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    torch.testing.assert_close(split_logits(score, q, k), pair_logits(score, q, k, getattr(score, "logit_scale", 1)))
    torch.testing.assert_close(split_logits(score, q, k), score.logits(q, k))
    weights = torch.randn(5, 7)
    grads_split = torch.autograd.grad((split_logits(score, q, k) * weights).sum(), list(score.parameters()))
    grads_pairs = torch.autograd.grad((score.logits(q, k) * weights).sum(), list(score.parameters()))
    for a, b in zip(grads_split, grads_pairs):
        torch.testing.assert_close(a, b)


def test_wide_hidden_and_bias_init():
    """hidden="wide" is (P, P) with the paper's init draws; bias_init sets every hidden bias, never the output's."""
    torch.manual_seed(0)
    wide = NeuralScore(16, 6, hidden="wide")
    torch.manual_seed(0)
    explicit = NeuralScore(16, 6, hidden=(6, 6))
    assert wide.hidden == (6, 6) and NeuralScore(16, 6, hidden="paper").hidden == (6, 3)
    for a, b in zip(wide.parameters(), explicit.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    biased = NeuralScore(16, 8, bias_init=0.5)
    torch.manual_seed(0)
    paper = NeuralScore(16, 8)
    *hidden, last = biased.linears()
    assert all(torch.equal(layer.bias, torch.full_like(layer.bias, 0.5)) for layer in hidden)
    assert torch.equal(last.bias, paper.linears()[-1].bias)  # the output bias and all weights stay the paper's
    for a, b in zip(biased.linears(), paper.linears()):
        assert torch.equal(a.weight, b.weight)


def test_leaky_relu_score_is_the_written_out_mlp():
    score = NeuralScore(16, 4, activation="leaky_relu")
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    a, b = score.q_proj(q), score.k_proj(k)  # (L, P), (S, P)
    x = torch.cat([a[:, None].expand(-1, 7, -1), b[None].expand(5, -1, -1)], -1)  # (L, S, 2P)
    first, second, third = score.linears()
    leaky = lambda t: torch.where(t > 0, t, 0.01 * t)  # noqa: E731
    torch.testing.assert_close(score.logits(q, k), third(leaky(second(leaky(first(x))))).squeeze(-1))


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
    A, Bk, rest, (q_dot, k_dot) = score.split(q, k, dot_term=True)
    torch.testing.assert_close(q_dot @ k_dot.transpose(-2, -1), dot)
    assert mlp.split(q, k, dot_term=True)[3] is None
    with pytest.raises(ValueError, match="residual=True"):
        score.split(q, k)


def test_zero_last_sets_the_zero_init_apart_from_residual():
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    dot = torch.einsum("ble,bse->bls", q, k) / 4.0  # sqrt(16)
    torch.manual_seed(0)
    random_mlp = NeuralScore(16, 4, residual=True, zero_last=False)
    assert random_mlp.linears()[-1].weight.abs().sum() > 0  # the MLP keeps its random init
    torch.manual_seed(0)
    plain = NeuralScore(16, 4)  # same seed, same draws: the same MLP without the dot product
    torch.testing.assert_close(random_mlp.state_dict(), plain.state_dict())
    torch.testing.assert_close(random_mlp.logits(q, k), plain.logits(q, k) + dot)
    flat = NeuralScore(16, 4, zero_last=True)  # no residual: a constant score, uniform attention at init
    assert torch.equal(flat.logits(q, k), torch.zeros(2, 5, 7))
    assert NeuralScore(16, 4, residual=True).zero_last and not NeuralScore(16, 4).zero_last


def test_options_pass_through_models():
    lm = minina.TransformerLM(vocab_size=11, dim=32, depth=2, heads=2, max_seq_len=8, attention="neural",
                              score_options={"init": "kaiming", "learn_scale": True})
    scores = [m for m in lm.modules() if isinstance(m, NeuralScore)]
    assert len(scores) == 2 and all(s.learn_scale and s.init == "kaiming" for s in scores)
    lm.loss(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))).backward()
    assert all(s.logit_scale.grad is not None for s in scores)


def test_reliable_options_are_a_studied_variant_and_build_a_score():
    assert RELIABLE_SCORE_OPTIONS in [options for options in VARIANTS.values() if options]
    score = NeuralScore(64, **RELIABLE_SCORE_OPTIONS)
    assert score.logits(torch.randn(3, 64), torch.randn(4, 64)).shape == (3, 4)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
def test_reliable_options_run_on_every_backend(backend):
    """The recommended score is one every backend takes: output and gradients equal the float64 reference."""
    if backend == "triton":
        pytest.importorskip("triton", reason="backend='triton' needs the triton package")
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1: the kernels cannot run")
    if backend == "compiled" and compiled.unavailable_reason():
        pytest.skip(f"backend='compiled' unavailable: {compiled.unavailable_reason()}")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    score = NeuralScore(32, **RELIABLE_SCORE_OPTIONS).to(device)
    with torch.no_grad():  # the last layer starts small: make every layer matter to the gradients
        for parameter in score.parameters():
            parameter.normal_(0, 0.5)
    q, k, v = (torch.randn(2, 2, n, 32, device=device, requires_grad=True) for n in (19, 23, 23))
    reference = copy.deepcopy(score).double()
    args = [t.detach().double().requires_grad_() for t in (q, k, v)]
    weight = torch.randn(2, 2, 19, 32, device=device)
    expected = neural_attention(*args, reference, is_causal=True, backend="reference")
    expected_grads = torch.autograd.grad((expected * weight.double()).sum(), [*args, *reference.parameters()])
    out = neural_attention(q, k, v, score, is_causal=True, backend=backend)
    grads = torch.autograd.grad((out * weight).sum(), [q, k, v, *score.parameters()])
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)


def test_repr_names_the_options():
    assert "init" not in repr(NeuralScore(64)) and "learn_scale" not in repr(NeuralScore(64))
    assert "init='kaiming', learn_scale=True" in repr(NeuralScore(64, init="kaiming", learn_scale=True))
    assert "bias_init=0.5, residual=True" in repr(NeuralScore(64, bias_init=0.5, residual=True))
    assert "hidden=(2, 2)" in repr(NeuralScore(64, hidden="wide"))
    assert "zero_last" not in repr(NeuralScore(64, residual=True))
    assert "residual=True, zero_last=False" in repr(NeuralScore(64, residual=True, zero_last=False))
    assert "zero_last=True" in repr(NeuralScore(64, zero_last=True))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"init": "xavier"}, ValueError, "init must be one of"),
    ({"learn_scale": 1}, TypeError, "learn_scale must be a bool"),
    ({"scale_init": 5.0}, ValueError, "scale_init applies only with learn_scale=True"),
    ({"learn_scale": True, "scale_init": 0.0}, ValueError, "scale_init must be a positive finite number"),
    ({"learn_scale": True, "scale_init": -1}, ValueError, "scale_init must be a positive finite number"),
    ({"learn_scale": True, "scale_init": math.inf}, ValueError, "scale_init must be a positive finite number"),
    ({"learn_scale": True, "scale_init": math.nan}, ValueError, "scale_init must be a positive finite number"),
    ({"learn_scale": True, "scale_init": True}, ValueError, "scale_init must be a positive finite number"),
    ({"learn_scale": True, "scale_init": "5"}, ValueError, "scale_init must be a positive finite number"),
    ({"hidden": "narrow"}, ValueError, "hidden must be 'paper', 'wide' or a sequence"),
    ({"activation": "tanh"}, ValueError, "activation must be one of"),
    ({"bias_init": math.nan}, ValueError, "bias_init must be a finite number or None"),
    ({"bias_init": True}, ValueError, "bias_init must be a finite number or None"),
    ({"bias_init": "0.5"}, ValueError, "bias_init must be a finite number or None"),
    ({"residual": 1}, TypeError, "residual must be a bool"),
    ({"zero_last": 0}, TypeError, "zero_last must be a bool or None"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralScore(64, **kwargs)


@pytest.mark.skipif("chunked" not in minina.attention.BACKENDS, reason="no chunked backend")
def test_chunked_backend_sees_the_folded_scale():
    score = NeuralScore(16, 4, init="kaiming", learn_scale=True)
    with torch.no_grad():
        score.logit_scale.fill_(2.3)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 3)
    outs = [minina.neural_attention(q, k, v, score, is_causal=True, backend=b) for b in ("reference", "chunked")]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(out.sum(), score.logit_scale)[0] for out in outs]
    torch.testing.assert_close(grads[1], grads[0])
