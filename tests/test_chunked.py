"""The chunked backend against the reference: outputs and every gradient over shapes, masks, widths and dtypes."""
import math

import pytest
import torch

import minina
from minina import MultiHeadAttention, NeuralScore, neural_attention
from minina.chunked import chunked_neural_attention, default_block_size
from minina.tools.candidates import CandidateScore


def make_mask(kind, batch, L, S, dtype):
    """A mask of the given kind whose query row 1 (if any) may attend to nothing."""
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(L, S) > 0.3  # (L, S), broadcast over batch
    elif kind == "bool_heads":
        mask = torch.rand(batch[-1], 1, S) > 0.3  # (H, 1, S), broadcast over batch and queries
    else:
        mask = torch.randn(*batch, L, 1, dtype=dtype) + torch.randn(S, dtype=dtype)  # (..., L, S) float
    if mask.dtype == torch.bool:
        mask[..., 1 % mask.shape[-2], :] = False
    else:
        mask[..., 1 % L, :] = -math.inf
    return mask


def outputs_and_grads(backend, q, k, v, score, attn_mask=None, is_causal=False, **blocks):
    """The output and the gradients of a random projection of it w.r.t. q, k, v, the score's parameters, the mask."""
    inputs = [q, k, v, *score.parameters()] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad
                                               else [])
    if backend == "reference":
        out = neural_attention(q, k, v, score, attn_mask, is_causal=is_causal, backend="reference")
    else:
        out = chunked_neural_attention(q, k, v, score, attn_mask, is_causal=is_causal, **blocks)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)


def assert_same(q, k, v, score, attn_mask=None, is_causal=False, tolerance=None, **blocks):
    expected, expected_grads = outputs_and_grads("reference", q, k, v, score, attn_mask, is_causal)
    out, grads = outputs_and_grads("chunked", q, k, v, score, attn_mask, is_causal, **blocks)
    tolerance = tolerance or {}
    torch.testing.assert_close(out, expected, **tolerance)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad is not None and torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, **tolerance)


def random_inputs(q_shape, k_shape, v_shape, dtype=torch.float64):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in (q_shape, k_shape, v_shape)]


@pytest.mark.parametrize("L, S", [(1, 1), (7, 7), (13, 13), (5, 19), (19, 5), (1, 9)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "bool_heads", "float"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_equals_reference_over_shapes_and_masks(L, S, mask_kind, is_causal):
    score = NeuralScore(8).double()  # the paper's widths: d' = 2, MLP 4 -> 2 -> 1 -> 1
    q, k, v = random_inputs((2, 3, L, 8), (2, 3, S, 8), (2, 3, S, 5))
    mask = make_mask(mask_kind, (2, 3), L, S, torch.float64)
    assert_same(q, k, v, score, mask, is_causal, block_l=4, block_s=3)  # L, S not multiples of the blocks


@pytest.mark.parametrize("proj_dim", [2, 4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_reference_over_widths_and_dtypes(proj_dim, dtype):
    score = NeuralScore(32, proj_dim=proj_dim).to(dtype)
    q, k, v = random_inputs((2, 2, 21, 32), (2, 2, 21, 32), (2, 2, 21, 16), dtype)
    mask = make_mask("float", (2, 2), 21, 21, dtype)
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else None
    assert_same(q, k, v, score, mask, True, tolerance, block_l=8, block_s=8)


@pytest.mark.parametrize("options", [dict(hidden=(3,)), dict(hidden=(6, 5, 3)), dict(hidden=(4, 2), activation="gelu"),
                                     dict(init="kaiming", learn_scale=True, scale_init=3.0),
                                     dict(activation="gelu", bias_init=0.5)])
def test_any_hidden_widths_activation_and_score_options(options):
    score = CandidateScore(8, proj_dim=3, **options).double()  # NeuralScore, or with the study's options
    q, k, v = random_inputs((2, 9, 8), (2, 11, 8), (2, 11, 4))
    assert_same(q, k, v, score, make_mask("bool", (2,), 9, 11, None), True, block_l=4, block_s=4)


def residual_score(head_dim, **options):
    """A residual score whose zero-initialized last layer is randomized, so that every gradient path is exercised."""
    score = CandidateScore(head_dim, residual=True, **options).double()
    with torch.no_grad():
        for parameter in score.linears()[-1].parameters():
            parameter.normal_()
    return score


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_residual_score_equals_reference(activation, is_causal):
    score = residual_score(8, proj_dim=3, activation=activation)
    q, k, v = random_inputs((2, 3, 9, 8), (2, 3, 11, 8), (2, 3, 11, 4))
    assert_same(q, k, v, score, make_mask("bool", (2, 3), 9, 11, None), is_causal, block_l=4, block_s=3)
    q, k, v = random_inputs((2, 3, 6, 8), (3, 7, 8), (7, 4))  # k shared over batch, v over batch and heads
    assert_same(q, k, v, residual_score(8, learn_scale=True), None, False, block_l=4, block_s=4)


def test_residual_score_adds_the_scaled_dot_product():
    """At init the MLP's last layer is zero, so the residual score is exactly scaled dot-product attention."""
    q, k, v = random_inputs((2, 5, 8), (2, 7, 8), (2, 7, 3))
    score = NeuralScore(8, residual=True).double()
    expected = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v  # written out, independently
    torch.testing.assert_close(chunked_neural_attention(q, k, v, score, block_l=2, block_s=3), expected)
    with pytest.raises(ValueError, match="residual=True"):
        score.split(q, k)  # a backend that ignores the dot product must not get a residual score


def test_batch_and_head_broadcasting():
    score = NeuralScore(8).double()
    q, k, v = random_inputs((2, 3, 6, 8), (3, 7, 8), (7, 4))  # k shared over batch, v over batch and heads
    assert_same(q, k, v, score, make_mask("bool_heads", (2, 3), 6, 7, None), False, block_l=4, block_s=4)
    q, k, v = random_inputs((1, 3, 6, 8), (2, 1, 7, 8), (2, 3, 7, 4))
    assert_same(q, k, v, score, None, True, block_l=2, block_s=5)


def test_float_mask_gradient():
    score = NeuralScore(8).double()
    q, k, v = random_inputs((2, 3, 6, 8), (2, 3, 7, 8), (2, 3, 7, 4))
    for shape in [(6, 7), (3, 1, 7), (2, 1, 6, 1)]:  # full, broadcast over queries, broadcast over keys
        mask = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        assert_same(q, k, v, score, mask, True, block_l=4, block_s=3)


def test_default_blocks_and_empty_sequences():
    score = NeuralScore(8).double()
    assert_same(*random_inputs((2, 300, 8), (2, 300, 8), (2, 300, 3)), score, is_causal=True)
    for L, S in [(0, 5), (5, 0)]:
        q, k, v = random_inputs((2, L, 8), (2, S, 8), (2, S, 3))
        out = chunked_neural_attention(q, k, v, score)
        assert torch.equal(out, torch.zeros(2, L, 3, dtype=torch.float64))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))


class _Chunked(torch.nn.Module):
    def __init__(self, score):
        super().__init__()
        self.score = score

    def forward(self, q, k, v, mask):
        return chunked_neural_attention(q, k, v, self.score, mask, is_causal=True, block_l=2, block_s=4)


def test_gradcheck():
    score = NeuralScore(4, proj_dim=2, hidden=(3, 2), activation="gelu").double()
    q, k, v = random_inputs((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3))
    mask = make_mask("float", (1, 2), 5, 6, torch.float64).requires_grad_()  # with a fully masked row
    names = ["score." + name for name, _ in score.named_parameters()]

    def f(q, k, v, mask, *weights):
        return torch.func.functional_call(_Chunked(score), dict(zip(names, weights)), (q, k, v, mask))

    weights = [p.detach().clone().requires_grad_() for p in score.parameters()]
    assert torch.autograd.gradcheck(f, (q, k, v, mask, *weights))
    score = residual_score(4, proj_dim=2, hidden=(3, 2))
    names = ["score." + name for name, _ in score.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in score.parameters()]
    assert torch.autograd.gradcheck(f, (q, k, v, mask, *weights))



@pytest.mark.parametrize("loss", [lambda out: out.sum(), lambda out: (out ** 2).sum()], ids=["linear", "quadratic"])
def test_double_backward_raises_instead_of_giving_wrong_numbers(loss):
    """The backward is not differentiable itself: create_graph=True raises, also for a loss linear in the output
    (once_differentiable lets that one through with the second derivative's backward terms missing)."""
    score = NeuralScore(4, proj_dim=2).double()
    q, k, v = random_inputs((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3))
    out = chunked_neural_attention(q, k, v, score, is_causal=True, block_l=2, block_s=4)
    with pytest.raises(RuntimeError, match=r"backend='chunked' has no double backward.*create_graph=True"):
        torch.autograd.grad(loss(out), q, create_graph=True)
    grad, = torch.autograd.grad(loss(chunked_neural_attention(q, k, v, score, is_causal=True, block_l=2, block_s=4)), q)
    expected, = torch.autograd.grad(loss(neural_attention(q, k, v, score, is_causal=True, backend="reference")), q)
    torch.testing.assert_close(grad, expected)

def test_low_precision_error_within_twice_reference_error():
    """bfloat16 inputs: fp32 tiles and accumulators keep the error within twice the bf16 reference's own error."""
    score = NeuralScore(32, proj_dim=4)
    q, k, v = (torch.randn(1, 2, 512, 32) for _ in range(3))
    exact = neural_attention(q, k, v, score, backend="reference")
    half_score = NeuralScore(32, proj_dim=4).bfloat16()
    half_score.load_state_dict(score.state_dict())
    half = [t.bfloat16() for t in (q, k, v)]
    reference_error = (neural_attention(*half, half_score, backend="reference").float() - exact).abs().max()
    chunked = chunked_neural_attention(*half, half_score, block_l=16, block_s=16)  # 32 key blocks to accumulate
    assert chunked.dtype == torch.bfloat16
    assert (chunked.float() - exact).abs().max() <= 2 * reference_error


def test_nothing_quadratic_is_saved_for_backward():
    score = NeuralScore(16)
    q, k, v = (torch.randn(1, 2, 96, 16, requires_grad=True) for _ in range(3))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = chunked_neural_attention(q, k, v, score, is_causal=True, block_l=16, block_s=16)
    assert max(saved) <= 2 * 96 * 16  # O(N * E) inputs and output, never O(N^2)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        neural_attention(q, k, v, score, is_causal=True, backend="reference")
    assert max(saved) >= 2 * 96 * 96  # the reference does keep pair tensors: the check can fail
    out.sum().backward()


def test_auto_and_models_use_chunked():
    q = torch.randn(2, 3)
    assert minina.attention.choose_backend("auto", q, q, NeuralScore(3)) == "chunked"
    torch.manual_seed(0)
    layer = MultiHeadAttention(32, heads=2, kind="neural", is_causal=True).double()
    torch.manual_seed(0)
    reference = MultiHeadAttention(32, heads=2, kind="neural", is_causal=True, backend="reference").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x))
    lm = minina.TransformerLM(vocab_size=11, dim=32, depth=2, heads=2, max_seq_len=16, kind="neural")
    assert all(block.attn.backend == "auto" for block in lm.blocks)


@pytest.mark.parametrize("blocks, match", [
    (dict(block_l=0), "block_l must be a positive int"), (dict(block_s=2.5), "block_s must be a positive int"),
])
def test_bad_block_sizes(blocks, match):
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        chunked_neural_attention(q, q, q, NeuralScore(4), **blocks)


def test_default_block_size_fits_the_tile_budget():
    assert default_block_size(8, 2, 4096, 4096) == 128
    assert default_block_size(1024, 16, 4096, 4096) == 16  # never below 16 rows
    assert default_block_size(1, 1, 4096, 4096) == 256  # never above 256 rows
    assert default_block_size(1, 1, 10, 3) == 10  # never longer than the sequences
