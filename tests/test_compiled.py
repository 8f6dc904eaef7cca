"""The compiled backend against the reference: outputs and every gradient over shapes, masks, options and dtypes;
one compile per configuration; a failed compile raised, and "auto" never compiling.

A configuration (batch dims, score MLP, dtype, mask kind and shape, blocks) compiles once per process, which takes
seconds, so the tests share a handful of them (BLOCK, BATCH, HEAD_DIM below) across many lengths.
"""
import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from minina import MultiHeadAttention, NeuralScore, neural_attention
from minina.attention import choose_backend
from minina.chunked import CompileError, chunked_neural_attention, compiled_block_size, compiled_neural_attention
from minina.tools.candidates import CandidateScore

BLOCK, BATCH, HEAD_DIM = 16, (2, 3), 8
LENGTHS = [(1, 1), (7, 7), (16, 16), (5, 19), (19, 5), (1, 9), (40, 17), (17, 40)]  # 16: exactly one block


@pytest.fixture(autouse=True)
def many_configurations(compile_works):
    """These tests compile more configurations in one process than torch.compile keeps by default (past its
    recompile_limit a tile runs eagerly: right, but not what the compile-counting test is for)."""
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def compiled(q, k, v, score, attn_mask=None, is_causal=False):
    return compiled_neural_attention(q, k, v, score, attn_mask, is_causal=is_causal, block_l=BLOCK, block_s=BLOCK)


def reference(q, k, v, score, attn_mask=None, is_causal=False):
    return neural_attention(q, k, v, score, attn_mask, is_causal=is_causal, backend="reference")


def outputs_and_grads(attention, q, k, v, score, attn_mask, is_causal):
    """The output and the gradients of a random projection of it w.r.t. q, k, v, the score's parameters, the mask."""
    inputs = [q, k, v, *score.parameters()] + ([attn_mask] if attn_mask is not None and attn_mask.requires_grad
                                               else [])
    out = attention(q, k, v, score, attn_mask, is_causal)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    return out, torch.autograd.grad((out * weight).sum(), inputs)


def assert_same(q, k, v, score, attn_mask=None, is_causal=False, attention=compiled, **tolerance):
    expected, expected_grads = outputs_and_grads(reference, q, k, v, score, attn_mask, is_causal)
    out, grads = outputs_and_grads(attention, q, k, v, score, attn_mask, is_causal)
    torch.testing.assert_close(out, expected, **tolerance)
    assert len(grads) == len(expected_grads)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected_grad, **tolerance)


def random_inputs(q_shape, k_shape, v_shape, dtype=torch.float64):
    return [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in (q_shape, k_shape, v_shape)]


def make_mask(kind, L, S):
    """A mask of the given kind whose query row 1 (if any) may attend to nothing; a float mask requires grad."""
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(L, S) > 0.3  # (L, S), broadcast over batch
    elif kind == "bool_heads":
        mask = torch.rand(BATCH[-1], 1, S) > 0.3  # (H, 1, S), broadcast over batch and queries
    else:
        mask = torch.randn(*BATCH, L, S, dtype=torch.float64)  # (..., L, S)
    if mask.dtype == torch.bool:
        mask[..., 1 % mask.shape[-2], :] = False
        return mask
    mask[..., 1 % L, :] = -math.inf
    return mask.requires_grad_()


@pytest.mark.parametrize("L, S", LENGTHS)
@pytest.mark.parametrize("mask_kind", [None, "bool_heads", "float"])  # test_score_options: an (L, S) mask
@pytest.mark.parametrize("is_causal", [False, True])
def test_equals_reference_over_shapes_and_masks(L, S, mask_kind, is_causal):
    score = NeuralScore(HEAD_DIM).double()  # the paper's widths: d' = 2, MLP 4 -> 2 -> 1 -> 1
    q, k, v = random_inputs((*BATCH, L, HEAD_DIM), (*BATCH, S, HEAD_DIM), (*BATCH, S, HEAD_DIM))
    assert_same(q, k, v, score, make_mask(mask_kind, L, S), is_causal)


def test_float_mask_gradient_when_broadcast():
    score = NeuralScore(HEAD_DIM).double()
    for L, S in [(6, 7), (20, 33)]:
        q, k, v = random_inputs((*BATCH, L, HEAD_DIM), (*BATCH, S, HEAD_DIM), (*BATCH, S, HEAD_DIM))
        mask = torch.randn(BATCH[-1], 1, S, dtype=torch.float64, requires_grad=True)  # over batch and queries
        assert_same(q, k, v, score, mask, True)


def residual_score(head_dim, **options):
    """A residual score whose zero-initialized last layer is randomized, so that every gradient path is exercised."""
    score = CandidateScore(head_dim, residual=True, **options).double()
    with torch.no_grad():
        for parameter in score.linears()[-1].parameters():
            parameter.normal_()
    return score


@pytest.mark.parametrize("is_causal", [False, True])
def test_score_options(is_causal):
    """Three hidden layers, GELU, a learned scale and the residual dot product, one (L, S) bool mask, and k and v
    broadcast over the batch."""
    score = residual_score(HEAD_DIM, proj_dim=3, hidden=(3, 2, 2), activation="gelu", learn_scale=True,
                           bias_init=0.5)
    for L, S in [(6, 7), (9, 11), (21, 18), (20, 3)]:
        q, k, v = random_inputs((2, 3, L, HEAD_DIM), (3, S, HEAD_DIM), (S, 4))  # k shared over batch, v also heads
        assert_same(q, k, v, score, make_mask("bool", L, S), is_causal)


def test_float32_and_bfloat16_with_gelu():
    score = NeuralScore(32, proj_dim=4, activation="gelu")
    q, k, v = random_inputs((2, 2, 21, 32), (2, 2, 21, 32), (2, 2, 21, 16), torch.float32)
    mask = torch.randn(2, 2, 21, 1) + torch.randn(21)  # float, no gradient wanted
    assert_same(q, k, v, score, mask, True, rtol=1e-4, atol=1e-5)
    q, k, v = (torch.randn(1, 2, 512, 32) for _ in range(3))  # bf16: fp32 tiles keep the error within twice the
    exact = neural_attention(q, k, v, score, backend="reference")  # bf16 reference's own (flash-attention's rule)
    half_score = NeuralScore(32, proj_dim=4, activation="gelu").bfloat16()
    half_score.load_state_dict(score.state_dict())
    half = [t.bfloat16() for t in (q, k, v)]
    reference_error = (neural_attention(*half, half_score, backend="reference").float() - exact).abs().max()
    with torch.no_grad():
        out = compiled(*half, half_score)  # 32 key blocks to accumulate
    assert out.dtype == torch.bfloat16
    assert (out.float() - exact).abs().max() <= 2 * reference_error


def test_one_compile_per_configuration_for_any_length():
    """A configuration of its own compiles a forward and a backward tile, then no length or causality adds one."""
    score = NeuralScore(4)

    def run(L, S, is_causal):
        q, k, v = random_inputs((3, L, 4), (3, S, 4), (3, S, 2), torch.float32)
        compiled(q, k, v, score, None, is_causal).sum().backward()

    before = counters["stats"]["unique_graphs"]
    run(5, 5, False)
    assert counters["stats"]["unique_graphs"] == before + 2  # the count sees compiles
    for L, S in [(1, 1), (9, 3), (30, 17), (16, 64), (100, 100)]:
        for is_causal in (False, True):
            run(L, S, is_causal)
    assert counters["stats"]["unique_graphs"] == before + 2


class _Compiled(torch.nn.Module):
    def __init__(self, score):
        super().__init__()
        self.score = score

    def forward(self, q, k, v, mask):
        return compiled(q, k, v, self.score, mask, True)


def test_gradcheck_and_modules():
    score = NeuralScore(HEAD_DIM).double()
    q, k, v = random_inputs((*BATCH, 5, HEAD_DIM), (*BATCH, 6, HEAD_DIM), (*BATCH, 6, HEAD_DIM))
    mask = make_mask("float", 5, 6)  # with a fully masked row
    names = ["score." + name for name, _ in score.named_parameters()]

    def f(q, k, v, mask, *weights):
        return torch.func.functional_call(_Compiled(score), dict(zip(names, weights)), (q, k, v, mask))

    weights = [p.detach().clone().requires_grad_() for p in score.parameters()]
    assert torch.autograd.gradcheck(f, (q, k, v, mask, *weights), fast_mode=True)
    dim = BATCH[-1] * HEAD_DIM
    torch.manual_seed(0)
    layer = MultiHeadAttention(dim, heads=BATCH[-1], kind="neural", is_causal=True, backend="compiled").double()
    torch.manual_seed(0)
    expected = MultiHeadAttention(dim, heads=BATCH[-1], kind="neural", is_causal=True, backend="reference").double()
    x = torch.randn(BATCH[0], 9, dim, dtype=torch.float64)  # default block 16: a configuration used above
    torch.testing.assert_close(layer(x), expected(x))



@pytest.mark.parametrize("loss", [lambda out: out.sum(), lambda out: (out ** 2).sum()], ids=["linear", "quadratic"])
def test_double_backward_raises_instead_of_giving_wrong_numbers(loss):
    """create_graph=True raises, also for a loss linear in the output, which once_differentiable would let through."""
    score = NeuralScore(HEAD_DIM).double()
    q, k, v = random_inputs((*BATCH, 5, HEAD_DIM), (*BATCH, 6, HEAD_DIM), (*BATCH, 6, HEAD_DIM))
    with pytest.raises(RuntimeError, match=r"backend='compiled' has no double backward.*create_graph=True"):
        torch.autograd.grad(loss(compiled(q, k, v, score, is_causal=True)), q, create_graph=True)

def test_empty_sequences_and_nothing_quadratic_saved():
    score = NeuralScore(HEAD_DIM).double()
    for L, S in [(0, 5), (5, 0)]:
        q, k, v = random_inputs((*BATCH, L, HEAD_DIM), (*BATCH, S, HEAD_DIM), (*BATCH, S, HEAD_DIM))
        out = compiled(q, k, v, score)
        assert torch.equal(out, torch.zeros(*BATCH, L, HEAD_DIM, dtype=torch.float64))
        out.sum().backward()
        assert torch.equal(q.grad, torch.zeros_like(q))
    q, k, v = random_inputs((*BATCH, 96, HEAD_DIM), (*BATCH, 96, HEAD_DIM), (*BATCH, 96, HEAD_DIM))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        compiled(q, k, v, score, None, True)
    assert max(saved) <= math.prod(BATCH) * 96 * HEAD_DIM  # O(N * E) inputs and output, never O(N^2)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        reference(q, k, v, score, None, True)
    assert max(saved) >= math.prod(BATCH) * 96 * 96  # the reference does keep pair tensors: the check can fail


@pytest.mark.parametrize("blocks, match", [
    (dict(block_l=0), "block_l must be a positive int"), (dict(block_s=2.5), "block_s must be a positive int"),
])
def test_bad_block_sizes(blocks, match):
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match=match):
        compiled_neural_attention(q, q, q, NeuralScore(4), **blocks)


def test_block_size_fits_the_budget_and_the_length():
    assert compiled_block_size(8, 4096) == 256  # B * H = 8: (256 x 256) tiles
    assert compiled_block_size(64, 4096) == 64
    assert compiled_block_size(4096, 4096) == 16  # never below 16 rows
    assert compiled_block_size(8, 100) == 128  # no longer than the sequence needs
    assert compiled_block_size(8, 3) == 16


def big(*shape):
    """A tensor of this shape that allocates one element (choose_backend reads shapes only)."""
    return torch.zeros(1).expand(*shape)


def test_auto_on_cpu_never_compiles_and_depends_on_the_arguments_only(monkeypatch):
    """"auto" is chunked for every CPU call, large or small: a cold compile costs more than it saves at notebook
    sizes (docs/performance.md), and no environment variable (MININA_COMPILE once was one) or earlier call changes
    the answer."""
    score = NeuralScore(32)
    large, small = big(32, 2, 64, 32), big(8, 2, 32, 32)  # 262,144 pairs (notebook 06's model) and 16,384
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and says nothing
        for env in ("0", "1", None):
            if env is None:
                monkeypatch.delenv("MININA_COMPILE", raising=False)
            else:
                monkeypatch.setenv("MININA_COMPILE", env)
            assert choose_backend("auto", large, large, score) == "chunked"
            assert choose_backend("auto", small, small, score) == "chunked"
    assert choose_backend("compiled", small, small, score) == "compiled"  # by name it runs
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("fast", small, small, score)


def test_failed_compile_is_an_error_and_auto_stays_on_chunked(monkeypatch):
    def broken_compile(function, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("the compiler is out today")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    score = NeuralScore(HEAD_DIM)
    q, k, v = (torch.randn(2, 10, HEAD_DIM) for _ in range(3))
    with pytest.raises(CompileError, match="forward tile.*the compiler is out today"):
        neural_attention(q, k, v, score, backend="compiled")  # chosen explicitly: an error, not a fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing remembered, nothing to warn about
        out = neural_attention(q, k, v, score, is_causal=True)
        assert choose_backend("auto", q, v, score) == "chunked"
    torch.testing.assert_close(out, chunked_neural_attention(q, k, v, score, is_causal=True))
    with pytest.raises(CompileError, match="the compiler is out today"):  # and again: never remembered
        neural_attention(q, k, v, score, backend="compiled")
