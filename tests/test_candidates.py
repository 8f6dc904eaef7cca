"""The study's rejected score options (CandidateScore) do what they claim, on every backend that takes them."""
import math

import pytest
import torch
import torch.nn as nn

import minina
from minina import NeuralScore, neural_attention
from minina.attention import BACKENDS
from minina.chunked import chunked_neural_attention
from minina.scores import REJECTED_SCORE_OPTIONS
from minina.tools.candidates import CandidateScore
from minina.tools.study import CANDIDATES
from test_chunked import assert_same, make_mask, random_inputs
from test_scores import (assert_matches_float64_reference, assert_split_matches_logits_and_gradients,
                         backend_device, pair_logits)


def test_core_options_alone_are_neural_score():
    """Same seed, same draws, same logits: the study's runs of the recommended options are NeuralScore's."""
    for options in [{}, {"hidden": "wide", "activation": "gelu"}, {"residual": True, "hidden": (3, 5)}]:
        torch.manual_seed(4)
        candidate = CandidateScore(16, 4, **options)
        torch.manual_seed(4)
        core = NeuralScore(16, 4, **options)
        torch.testing.assert_close(candidate.state_dict(), core.state_dict(), rtol=0, atol=0)
        q, k = torch.randn(3, 16), torch.randn(5, 16)
        assert torch.equal(candidate.logits(q, k), core.logits(q, k))
        assert repr(candidate).replace("CandidateScore", "NeuralScore") == repr(core)


def test_kaiming_init_statistics():
    torch.manual_seed(0)
    score = CandidateScore(64, proj_dim=512, init="kaiming")
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
    kaiming = CandidateScore(32, 4, init="kaiming")
    torch.manual_seed(5)
    paper = NeuralScore(32, 4)
    assert torch.equal(kaiming.q_proj.weight, paper.q_proj.weight)
    assert torch.equal(kaiming.k_proj.bias, paper.k_proj.bias)
    assert not torch.equal(kaiming.linears()[0].weight, paper.linears()[0].weight)


@pytest.mark.parametrize("scale_init", [None, 2.5])
def test_learn_scale_multiplies_the_logit(scale_init):
    torch.manual_seed(1)
    score = CandidateScore(16, 4, learn_scale=True, scale_init=scale_init)
    torch.manual_seed(1)
    paper = NeuralScore(16, 4)
    expected_scale = 5.0 if scale_init is None else scale_init
    assert isinstance(score.logit_scale, nn.Parameter) and score.logit_scale.requires_grad
    assert score.logit_scale.item() == expected_scale
    assert not hasattr(CandidateScore(16, 4), "logit_scale")
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    unscaled = pair_logits(paper, q, k)
    torch.testing.assert_close(score.logits(q, k), unscaled * expected_scale)
    score.logits(q, k).sum().backward()
    torch.testing.assert_close(score.logit_scale.grad, unscaled.sum().detach())  # d(s * f)/ds = f


@pytest.mark.parametrize("options", [{"learn_scale": True}, {"init": "kaiming"},
                                     {"init": "kaiming", "learn_scale": True, "scale_init": 3.0}])
def test_split_matches_logits_and_gradients(options):
    score = CandidateScore(16, 4, **options)
    if score.learn_scale:
        with torch.no_grad():
            score.logit_scale.fill_(0.7)  # away from the initial value, so a missing fold would show
    assert_split_matches_logits_and_gradients(score, getattr(score, "logit_scale", 1))


def test_bias_init():
    """bias_init sets every hidden bias, never the output's."""
    torch.manual_seed(0)
    biased = CandidateScore(16, 8, bias_init=0.5)
    torch.manual_seed(0)
    paper = NeuralScore(16, 8)
    *hidden, last = biased.linears()
    assert all(torch.equal(layer.bias, torch.full_like(layer.bias, 0.5)) for layer in hidden)
    assert torch.equal(last.bias, paper.linears()[-1].bias)  # the output bias and all weights stay the paper's
    for a, b in zip(biased.linears(), paper.linears()):
        assert torch.equal(a.weight, b.weight)


def test_leaky_relu_score_is_the_written_out_mlp_on_the_reference_backend_only():
    score = CandidateScore(16, 4, activation="leaky_relu")
    q, k = torch.randn(5, 16), torch.randn(7, 16)
    a, b = score.q_proj(q), score.k_proj(k)  # (L, P), (S, P)
    x = torch.cat([a[:, None].expand(-1, 7, -1), b[None].expand(5, -1, -1)], -1)  # (L, S, 2P)
    first, second, third = score.linears()
    leaky = lambda t: torch.where(t > 0, t, 0.01 * t)  # noqa: E731
    torch.testing.assert_close(score.logits(q, k), third(leaky(second(leaky(first(x))))).squeeze(-1))
    with pytest.raises(ValueError, match="activation='leaky_relu' is a study option that only backend='reference'"):
        neural_attention(q, k, k, score, backend="chunked")


def test_zero_last_sets_the_zero_init_apart_from_residual():
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    dot = torch.einsum("ble,bse->bls", q, k) / 4.0  # sqrt(16)
    torch.manual_seed(0)
    random_mlp = CandidateScore(16, 4, residual=True, zero_last=False)
    assert random_mlp.linears()[-1].weight.abs().sum() > 0  # the MLP keeps its random init
    torch.manual_seed(0)
    plain = NeuralScore(16, 4)  # same seed, same draws: the same MLP without the dot product
    torch.testing.assert_close(random_mlp.state_dict(), plain.state_dict())
    torch.testing.assert_close(random_mlp.logits(q, k), plain.logits(q, k) + dot)
    flat = CandidateScore(16, 4, zero_last=True)  # no residual: a constant score, uniform attention at init
    assert torch.equal(flat.logits(q, k), torch.zeros(2, 5, 7))
    assert CandidateScore(16, 4, residual=True).zero_last and not CandidateScore(16, 4).zero_last


def test_repr_names_the_options():
    assert "init" not in repr(CandidateScore(64)) and "learn_scale" not in repr(CandidateScore(64))
    assert "init='kaiming', learn_scale=True" in repr(CandidateScore(64, init="kaiming", learn_scale=True))
    assert "residual=True, bias_init=0.5" in repr(CandidateScore(64, bias_init=0.5, residual=True))
    assert "zero_last" not in repr(CandidateScore(64, residual=True))
    assert "residual=True, zero_last=False" in repr(CandidateScore(64, residual=True, zero_last=False))
    assert "zero_last=True" in repr(CandidateScore(64, zero_last=True))


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
    ({"activation": "tanh"}, ValueError, r"activation must be one of \['gelu', 'leaky_relu', 'relu'\]"),
    ({"bias_init": math.nan}, ValueError, "bias_init must be a finite number or None"),
    ({"bias_init": True}, ValueError, "bias_init must be a finite number or None"),
    ({"bias_init": "0.5"}, ValueError, "bias_init must be a finite number or None"),
    ({"zero_last": 0}, TypeError, "zero_last must be a bool or None"),
    ({"hidden": "narrow"}, ValueError, "hidden must be 'paper', 'wide' or a sequence"),
    ({"residual": 1}, TypeError, "residual must be a bool"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        CandidateScore(64, **kwargs)


def test_rejected_options_are_not_neural_score_options():
    for name in REJECTED_SCORE_OPTIONS:
        with pytest.raises(TypeError, match=name):
            NeuralScore(64, **{name: None})
    with pytest.raises(ValueError, match="activation must be one of"):
        NeuralScore(64, activation="leaky_relu")


@pytest.mark.parametrize("candidate", [v for v, options in CANDIDATES.items() if options])
def test_every_study_candidate_equals_reference(candidate):
    """Each option set the learnability study trains (residual, zero_last, ...) works in the chunked backend, or
    (leaky ReLU, a study-only activation) says it needs the reference backend."""
    score = CandidateScore(8, proj_dim=3, **CANDIDATES[candidate]).double()
    with torch.no_grad():
        for parameter in score.linears()[-1].parameters():  # zero at init for residual scores: exercise every path
            parameter.normal_()
    q, k, v = random_inputs((2, 2, 7, 8), (2, 2, 9, 8), (2, 2, 9, 3))
    if score.activation not in minina.activations.ACTIVATIONS:
        with pytest.raises(ValueError, match="only backend='reference'"):
            chunked_neural_attention(q, k, v, score, block_l=4, block_s=4)
        return
    assert_same(q, k, v, score, make_mask("bool", (2, 2), 7, 9, None), True, block_l=4, block_s=4)


def test_chunked_backend_sees_the_folded_scale():
    score = CandidateScore(16, 4, init="kaiming", learn_scale=True)
    with torch.no_grad():
        score.logit_scale.fill_(2.3)
    q, k, v = torch.randn(2, 5, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 3)
    outs = [minina.neural_attention(q, k, v, score, is_causal=True, backend=b) for b in ("reference", "chunked")]
    torch.testing.assert_close(outs[1], outs[0])
    grads = [torch.autograd.grad(out.sum(), score.logit_scale)[0] for out in outs]
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in ("auto", "reference")])
def test_every_backend_sees_the_folded_scale(backend, request):
    """A learned scale on a residual score with kaiming init and hidden biases: output and every gradient (the
    scale's too) against the float64 reference. The scale multiplies the MLP, not q . k."""
    device = backend_device(backend, request)
    score = CandidateScore(16, 4, init="kaiming", learn_scale=True, bias_init=0.5, residual=True).to(device)
    with torch.no_grad():
        score.logit_scale.fill_(2.3)
        score.linears()[-1].weight.normal_()  # zero at init for a residual score
    q, k, v = (torch.randn(2, n, 16, device=device, requires_grad=True) for n in (5, 9, 9))
    assert_matches_float64_reference(backend, score, q, k, v)
