"""The fused Triton kernels against the float64 reference: outputs and every gradient, masks, shapes, dtypes, errors.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the same kernels run on CPU tensors in Triton's
interpreter; shapes stay small (blocks of 16) so that several query and key blocks, and their ragged ends, are
exercised in a few seconds per case. With a GPU the same grid runs on CUDA.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from minina import MultiHeadAttention, NeuralScore, neural_attention, resolve_backend

pytest.importorskip("triton", reason="backend='triton' needs the triton package")
from minina.triton_kernels import triton_neural_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run")


def lively_score(head_dim, **options):
    """A NeuralScore with wide random parameters, so that ReLU units are alive and every gradient is non-zero."""
    score = NeuralScore(head_dim, **options)
    with torch.no_grad():
        for layer in [score.q_proj, score.k_proj, *score.linears()]:
            layer.weight.normal_(0.0, 1.5 / layer.in_features ** 0.5)
            layer.bias.normal_(0.0, 0.5)
    return score.to(DEVICE)


def make_mask(kind, shape):
    """None, a boolean mask (True = may attend) with its first row fully masked, or a float mask with some -inf."""
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(shape, device=DEVICE) > 0.3
        mask[..., 0, :] = False  # a query with nothing to attend: zero output, no NaN
        return mask
    return torch.randn(shape, device=DEVICE).masked_fill(torch.rand(shape, device=DEVICE) < 0.2, float("-inf"))


def reference_grads(q, k, v, score, attn_mask, is_causal, d_out):
    """Output and gradients (q, k, v, then every score parameter) of the reference backend in float64."""
    score64 = copy.deepcopy(score).double()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    out = neural_attention(*leaves, score64, mask64, is_causal, backend="reference")
    return [out, *torch.autograd.grad(out, [*leaves, *score64.parameters()], d_out.double())]


def triton_grads(q, k, v, score, attn_mask, is_causal, d_out, blocks=(16, 16)):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = triton_neural_attention(*leaves, score, attn_mask, is_causal, block_m=blocks[0], block_n=blocks[1])
    return [out, *torch.autograd.grad(out, [*leaves, *score.parameters()], d_out)]


NAMES = ["out", "dq", "dk", "dv"]


def assert_matches_reference(q, k, v, score, attn_mask=None, is_causal=False, blocks=(16, 16)):
    d_out = torch.randn(*torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]), q.shape[-2], v.shape[-1],
                        device=DEVICE, dtype=v.dtype)
    expected = reference_grads(q, k, v, score, attn_mask, is_causal, d_out)
    actual = triton_grads(q, k, v, score, attn_mask, is_causal, d_out, blocks)
    names = NAMES + [f"d {name}" for name, _ in score.named_parameters()]
    for name, a, e in zip(names, actual, expected):
        assert a.shape == e.shape and a.dtype == q.dtype, name
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return actual


@pytest.mark.parametrize("L, S", [(20, 35), (35, 20)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_matches_reference(L, S, is_causal, mask_kind):
    score = lively_score(8, proj_dim=4)
    q, k, v = (torch.randn(1, 2, n, d, device=DEVICE) for n, d in ((L, 8), (S, 8), (S, 5)))
    mask = make_mask(mask_kind, (L, S) if mask_kind == "bool" else (1, 2, L, S))
    out = assert_matches_reference(q, k, v, score, mask, is_causal)[0]
    if mask_kind == "bool":
        assert (out[..., 0, :] == 0).all()


@pytest.mark.parametrize("head_dim, options, blocks", [
    (64, {}, (None, None)),  # the paper: d' = 2, MLP 4 -> 2 -> 1 -> 1, the default launch configuration
    (32, {"proj_dim": 16}, (16, 16)),  # d' = 16, MLP 32 -> 16 -> 8 -> 1, the widest paper shape
    (16, {"proj_dim": 4, "hidden": (6, 3), "activation": "gelu"}, (16, 32)),  # widths not powers of two
    (16, {"proj_dim": 4, "learn_scale": True}, (32, 16)),  # logit_scale folded into the last layer by split()
])
def test_score_shapes_activations_and_blocks(head_dim, options, blocks):
    score = lively_score(head_dim, **options)
    L = 70 if blocks[0] is None else 40  # ragged: 70 = 2 * 32 + 6 with the default blocks
    q, k, v = (torch.randn(1, 1, L, head_dim, device=DEVICE) for _ in range(3))
    assert score.logits(q, k).std() > 0.1  # a live MLP, not a constant score
    assert_matches_reference(q, k, v, score, is_causal=True, blocks=blocks)


def test_strides_and_broadcast_batch_dims():
    score = lively_score(8, proj_dim=2)
    q = torch.randn(2, 20, 3, 8, device=DEVICE).transpose(1, 2)  # (B, H, L, E) from (B, L, H, E): strided
    k = torch.randn(1, 3, 18, 8, device=DEVICE)  # shared by the batch
    v = torch.randn(2, 1, 18, 16, device=DEVICE)[..., ::2]  # shared by the heads, every other feature
    assert_matches_reference(q, k, v, score, make_mask("float", (20, 18)))


@pytest.mark.parametrize("batch", [(), (2, 1, 2)])
def test_no_batch_dims_and_many_batch_dims(batch):
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(*batch, n, 8, device=DEVICE) for n in (17, 19, 19))
    assert_matches_reference(q, k, v, score, make_mask("bool", (17, 19)), is_causal=True)


def test_backward_is_deterministic():
    score = lively_score(8, proj_dim=4)
    q, k, v = (torch.randn(1, 2, 33, 8, device=DEVICE) for _ in range(3))
    d_out = torch.randn(1, 2, 33, 8, device=DEVICE)
    first, second = (triton_grads(q, k, v, score, None, True, d_out) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_the_reference(dtype):
    """Like flash-attention's tests: the kernel's error against float64 is at most twice (plus a hair) the error of
    the reference backend run in the same low precision."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter stores bf16 as uint16 and its bf16 tl.dot is wrong (triton 3.8); GPU only")
    score = lively_score(16, proj_dim=4)
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (20, 35, 35))
    d_out = torch.randn(1, 2, 20, 16, device=DEVICE)
    expected = reference_grads(q, k, v, score, None, True, d_out)
    low = [t.to(dtype) for t in (q, k, v, d_out)]
    score_low = copy.deepcopy(score).to(dtype)
    leaves = [t.detach().requires_grad_() for t in low[:3]]
    out = neural_attention(*leaves, score_low, is_causal=True, backend="reference")
    reference_low = [out, *torch.autograd.grad(out, [*leaves, *score_low.parameters()], low[3])]
    actual = triton_grads(*low[:3], score_low, None, True, low[3])
    for name, a, r, e in zip(NAMES + ["d score"] * 10, actual, reference_low, expected):
        assert a.dtype == dtype, name
        kernel_error, reference_error = (a.double() - e).abs().max(), (r.double() - e).abs().max()
        assert kernel_error <= 2 * reference_error + 1e-3 * e.abs().max(), (name, kernel_error, reference_error)


@pytest.mark.parametrize("options, shapes, message", [
    ({"hidden": (4, 2, 2)}, None, "two hidden layers"),
    ({"hidden": (17, 2)}, None, "h1 <= 16"),
    ({"hidden": (4, 17)}, None, "h2 <= 16"),
    ({}, (4, 300), "value head sizes up to 256"),
])
def test_unsupported_shapes_raise(options, shapes, message):
    score = NeuralScore(8, **options).to(DEVICE)
    L, value_dim = shapes or (4, 8)
    q, k, v = (torch.randn(n, d, device=DEVICE) for n, d in ((L, 8), (5, 8), (5, value_dim)))
    with pytest.raises(ValueError, match=message):
        triton_neural_attention(q, k, v, score)


def test_float64_and_mask_gradients_raise():
    score = NeuralScore(8).to(DEVICE)
    q = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*float64"):
        triton_neural_attention(q.double(), q.double(), q.double(), score.double())
    mask = torch.zeros(4, 4, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="float attn_mask"):
        triton_neural_attention(q, q, q, score, mask)


def test_cpu_tensors_without_the_interpreter_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="CUDA tensors, got q on cpu"):
        triton_neural_attention(q, q, q, NeuralScore(8))


def test_backend_triton_in_neural_attention_and_modules():
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(2, 2, n, 8, device=DEVICE) for n in (9, 12, 12))
    torch.testing.assert_close(neural_attention(q, k, v, score, is_causal=True, backend="triton"),
                               neural_attention(q, k, v, score, is_causal=True, backend="reference"))
    mha = MultiHeadAttention(16, heads=2, kind="neural", causal=True, backend="triton").to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    reference = copy.deepcopy(mha)
    reference.backend = "reference"
    torch.testing.assert_close(mha(x), reference(x))


def test_auto_uses_triton_for_supported_cuda_inputs_only():
    score = NeuralScore(8).to(DEVICE)
    q = torch.randn(4, 8, device=DEVICE)
    if DEVICE == "cpu":
        assert resolve_backend("auto", q, q, score) == "chunked"  # even with the interpreter on
        pytest.skip("auto picks triton on CUDA only; no GPU here")
    assert resolve_backend("auto", q, q, score) == "triton"
    assert resolve_backend("auto", q.double(), q.double(), score.double()) == "chunked"
    assert resolve_backend("auto", q, q, NeuralScore(8, hidden=(4, 4, 4)).to(DEVICE)) == "chunked"


def test_missing_triton_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "minina.triton_kernels", None)  # what importing without triton looks like
    q = torch.randn(4, 8)
    with pytest.raises(ImportError, match="backend='triton' needs the triton package"):
        neural_attention(q, q, q, NeuralScore(8), backend="triton")


def test_minina_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, minina\n"
            "q = torch.randn(3, 8)\n"
            "print(minina.neural_attention(q, q, q, minina.NeuralScore(8)).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([3, 8])"
