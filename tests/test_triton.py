"""The fused Triton kernels against the float64 reference: outputs and every gradient, masks, shapes, dtypes, errors.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the same kernels run on CPU tensors in Triton's
interpreter; shapes stay small (mostly blocks of 16, so that several query and key blocks and their ragged ends are
exercised) and every config of the autotune set runs once. With a GPU the same grid runs on CUDA. The comparisons
live in minina.tools.triton_check, which `python -m minina bench --device cuda --check` runs on a GPU from any install.
"""
import copy
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from minina import MultiHeadAttention, NeuralScore, dot_product_attention, neural_attention
from minina.activations import ACTIVATIONS, Activation
from minina.attention import choose_backend
from minina.tools import triton_check
from minina.tools.triton_check import assert_low_precision_within_the_rule, triton_grads

pytest.importorskip("triton", reason="backend='triton' needs the triton package")
from minina import triton_kernels  # noqa: E402
from minina.triton_kernels import AUTOTUNE_CONFIGS, KERNEL_ACTIVATIONS, supports, triton_neural_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETED,
                                reason="no GPU and TRITON_INTERPRET is not 1: the kernels cannot run")


def lively_score(head_dim, **options):
    return triton_check.lively_score(head_dim, DEVICE, **options)


def make_mask(kind, shape):
    return triton_check.make_mask(kind, shape, DEVICE)


assert_matches_reference = triton_check.assert_matches_reference  # launch: block_m=..., or nothing (default)
BLOCKS_16 = dict(block_m=16, block_n=16)  # small blocks: several blocks and ragged ends at small L and S


@pytest.mark.parametrize("L, S", [(20, 35), (35, 20)])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_matches_reference(L, S, is_causal, mask_kind):
    score = lively_score(8, proj_dim=4)
    q, k, v = (torch.randn(1, 2, n, d, device=DEVICE) for n, d in ((L, 8), (S, 8), (S, 5)))
    mask = make_mask(mask_kind, (L, S) if mask_kind == "bool" else (1, 2, L, S))
    out = assert_matches_reference(q, k, v, score, mask, is_causal, **BLOCKS_16)[0]
    if mask_kind == "bool":
        assert (out[..., 0, :] == 0).all()


def widest_fitting_h1(config):
    return max(h1 for h1 in (1, 2, 4, 8, 16) if triton_kernels._fits(config, h1))


@pytest.mark.parametrize("config", AUTOTUNE_CONFIGS, ids=lambda c: "{BLOCK_M}x{BLOCK_N}".format(**c.kwargs))
def test_every_autotune_config_matches_reference(config):
    """Each config of the autotune set, launched explicitly, with the widest score MLP it is meant for; L and S
    span two blocks and a ragged third."""
    h1 = widest_fitting_h1(config)
    score = lively_score(16, proj_dim=h1)  # MLP 2 h1 -> h1 -> h1 // 2 -> 1
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    L, S = 2 * block_m + 11, 2 * block_n + 5
    q, k, v = (torch.randn(1, 1, n, d, device=DEVICE) for n, d in ((L, 16), (S, 16), (S, 24)))
    launch = dict(block_m=block_m, block_n=block_n, num_warps=config.num_warps, num_stages=config.num_stages)
    causal = block_m != block_n  # the causal loop bounds matter most when the blocks differ
    assert_matches_reference(q, k, v, score, make_mask("float", (L, S)), is_causal=causal, **launch)


def test_the_autotune_set_has_64_and_128_row_blocks():
    """Hopper's fastest matrix instructions need 64-row blocks: the set offers them up to h1 = 8 (128 rows up to
    h1 = 4); only the widest MLPs (h1 = 16) are left with 16 x 16, the one config that fits them."""
    for h1 in (1, 2, 4, 8, 16):
        rows = {config.kwargs["BLOCK_M"] for config in triton_kernels._fitting_configs(AUTOTUNE_CONFIGS, {}, H1P=h1)}
        assert 16 in rows and (64 in rows) == (h1 <= 8) and (128 in rows) == (h1 <= 4), (h1, rows)


@pytest.mark.parametrize("L, S", [(300, 257), (257, 300), (0, 20), (20, 0)])
def test_long_and_empty_sequences_with_the_default_launch(L, S):
    """Lengths of a few blocks of the default config (the largest that fits: 128 x 32 for the paper's MLP), and no
    queries or no keys (zero outputs and gradients, as the reference)."""
    score = lively_score(64)  # the paper: d' = 2, MLP 4 -> 2 -> 1 -> 1
    q, k, v = (torch.randn(1, 2, n, 64, device=DEVICE) for n in (L, S, S))
    assert_matches_reference(q, k, v, score, make_mask("bool", (L, S)), is_causal=True)


@pytest.mark.parametrize("head_dim, options, blocks", [
    (64, {}, (None, None)),  # the paper: d' = 2, MLP 4 -> 2 -> 1 -> 1, the default launch configuration
    (32, {"proj_dim": 16}, (16, 16)),  # d' = 16, MLP 32 -> 16 -> 8 -> 1, the widest paper shape
    (16, {"proj_dim": 4, "hidden": (6, 3), "activation": "gelu"}, (16, 32)),  # widths not powers of two
    (16, {"proj_dim": 4, "learn_scale": True}, (32, 16)),  # the study's logit_scale, folded into the last layer
])
def test_score_shapes_activations_and_blocks(head_dim, options, blocks):
    score = lively_score(head_dim, **options)
    L = 70 if blocks[0] is None else 40
    q, k, v = (torch.randn(1, 1, L, head_dim, device=DEVICE) for _ in range(3))
    assert score.logits(q, k).std() > 0.1  # a live MLP, not a constant score
    assert_matches_reference(q, k, v, score, is_causal=True, block_m=blocks[0], block_n=blocks[1])


def test_strides_and_broadcast_batch_dims():
    score = lively_score(8, proj_dim=2)
    q = torch.randn(2, 20, 3, 8, device=DEVICE).transpose(1, 2)  # (B, H, L, E) from (B, L, H, E): strided
    k = torch.randn(1, 3, 18, 8, device=DEVICE)  # shared by the batch
    v = torch.randn(2, 1, 18, 16, device=DEVICE)[..., ::2]  # shared by the heads, every other feature
    assert_matches_reference(q, k, v, score, make_mask("float", (20, 18)), **BLOCKS_16)


@pytest.mark.parametrize("batch", [(), (2, 1, 2)])
def test_no_batch_dims_and_many_batch_dims(batch):
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(*batch, n, 8, device=DEVICE) for n in (17, 19, 19))
    assert_matches_reference(q, k, v, score, make_mask("bool", (17, 19)), is_causal=True, **BLOCKS_16)


def test_backward_is_deterministic():
    score = lively_score(8, proj_dim=4)
    q, k, v = (torch.randn(1, 2, 33, 8, device=DEVICE) for _ in range(3))
    d_out = torch.randn(1, 2, 33, 8, device=DEVICE)
    first, second = (triton_grads(q, k, v, score, None, True, d_out, **BLOCKS_16) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


LOW_PRECISION = [torch.float16, torch.bfloat16]
# Small in the interpreter; on a GPU long enough for fp16/bf16 sums over many keys.
LOW_PRECISION_LENGTHS = (20, 35) if DEVICE == "cpu" else (1000, 1100)


def skip_bf16_in_the_interpreter(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter stores bf16 as uint16 and its bf16 tl.dot is wrong (triton 3.8); GPU only")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_error_at_most_twice_the_reference(dtype):
    skip_bf16_in_the_interpreter(dtype)
    assert_low_precision_within_the_rule(dtype, LOW_PRECISION_LENGTHS, DEVICE)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_residual_score_in_low_precision_keeps_the_rule(dtype):
    """The q k^T tile in float16 or bfloat16 with float32 accumulation, as FlashAttention's."""
    skip_bf16_in_the_interpreter(dtype)
    assert_low_precision_within_the_rule(dtype, LOW_PRECISION_LENGTHS, DEVICE, residual=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_autocast_mixed_dtypes(dtype):
    """Under autocast split() gives A in float32 (its bias add promotes) but Bk and v in low precision; the kernels
    take the mix and keep the flash-attention error rule. The interpreter checks float16 only (see above)."""
    skip_bf16_in_the_interpreter(dtype)
    q = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=dtype)  # what autocast's q, k, v projections give
    with torch.autocast(DEVICE, dtype=dtype):
        A, Bk, _ = lively_score(16, proj_dim=4).split(q, q)
    assert A.dtype == torch.float32 and Bk.dtype == dtype  # the mixed case
    assert_low_precision_within_the_rule(dtype, LOW_PRECISION_LENGTHS, DEVICE, autocast=True)


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
    mha = MultiHeadAttention(16, heads=2, kind="neural", is_causal=True, backend="triton").to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE)
    reference = copy.deepcopy(mha)
    reference.backend = "reference"
    torch.testing.assert_close(mha(x), reference(x))


def test_auto_uses_triton_for_supported_cuda_inputs_only():
    score = NeuralScore(8).to(DEVICE)
    q = torch.randn(4, 8, device=DEVICE)
    if DEVICE == "cpu":
        assert choose_backend("auto", q, q, score) == "chunked"  # even with the interpreter on
        pytest.skip("auto picks triton on CUDA only; no GPU here")
    assert choose_backend("auto", q, q, score) == "triton"
    assert choose_backend("auto", q.double(), q.double(), score.double()) == "chunked"
    assert choose_backend("auto", q, q, NeuralScore(8, hidden=(4, 4, 4)).to(DEVICE)) == "chunked"


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


@pytest.mark.parametrize("loss", [torch.sum, lambda out: out.square().sum()], ids=["linear", "quadratic"])
def test_double_backward_raises_instead_of_giving_wrong_numbers(loss):
    """A loss linear in the output gives a backward whose incoming gradient needs no grad: once_differentiable let
    that through with a second derivative missing the kernels' terms. Any create_graph=True backward must raise."""
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(1, 1, 9, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    out = triton_neural_attention(q, k, v, score)
    with pytest.raises(RuntimeError, match=r"backend='triton' has no double backward.*create_graph=True"):
        torch.autograd.grad(loss(out), q, create_graph=True)
    (dq,) = torch.autograd.grad(loss(triton_neural_attention(q, k, v, score)), q)  # a single backward still runs
    (expected,) = torch.autograd.grad(loss(neural_attention(q, k, v, score, backend="reference")), q)
    torch.testing.assert_close(dq, expected)


def test_an_activation_the_kernels_lack_is_refused(monkeypatch):
    """A new entry in minina.activations.ACTIVATIONS must not run as ReLU: refused, and "auto" falls back."""
    assert set(KERNEL_ACTIVATIONS) <= set(ACTIVATIONS)
    monkeypatch.setitem(ACTIVATIONS, "tanh", Activation(nn.Tanh, torch.tanh, lambda x: 1 - torch.tanh(x) ** 2))
    score = NeuralScore(8, activation="tanh").to(DEVICE)
    q = torch.randn(4, 8, device=DEVICE)
    assert not supports(q, q, score) and supports(q, q, NeuralScore(8, activation="gelu").to(DEVICE))
    with pytest.raises(ValueError, match=r"activations \('relu', 'gelu'\), got score.activation='tanh'"):
        triton_neural_attention(q, q, q, score)
    assert choose_backend("auto", q, q, score) == "chunked"


@pytest.mark.parametrize("L, S, head_dim, is_causal, mask_kind, options, blocks", [
    (20, 35, 8, False, "float", {}, (16, 16)),  # the paper's MLP; E = 8 padded to a 16-wide q k^T tile
    (35, 20, 24, True, "bool", {"hidden": "wide", "activation": "gelu"}, (16, 32)),  # E = 24 in a 32-wide tile
    (20, 35, 24, True, None, {"learn_scale": True}, (32, 16)),  # the scale multiplies the MLP, not q . k
])
def test_residual_score_matches_reference(L, S, head_dim, is_causal, mask_kind, options, blocks):
    """NeuralScore(residual=True) adds q_i . k_j / sqrt(E): one more tile product in the forward, dS K and
    dS^T Q in the backward. Output and the gradients of q, k, v and every score parameter against float64;
    lengths that leave partial last blocks."""
    score = lively_score(head_dim, proj_dim=4, residual=True, **options)
    q, k, v = (torch.randn(1, 2, n, d, device=DEVICE) for n, d in ((L, head_dim), (S, head_dim), (S, 5)))
    mask = make_mask(mask_kind, (L, S) if mask_kind == "bool" else (1, 2, L, S))
    assert_matches_reference(q, k, v, score, mask, is_causal, block_m=blocks[0], block_n=blocks[1])


@pytest.mark.parametrize("L, S", [(0, 20), (20, 0)])
def test_residual_score_with_no_queries_or_no_keys(L, S):
    score = lively_score(8, proj_dim=2, residual=True)
    q, k, v = (torch.randn(1, 2, n, 8, device=DEVICE) for n in (L, S, S))
    assert_matches_reference(q, k, v, score, make_mask("bool", (L, S)), is_causal=True, **BLOCKS_16)


def test_residual_score_with_strides_and_broadcast_batch_dims():
    """The scaled q and k of the dot term broadcast and keep their strides like A and Bk."""
    score = lively_score(8, proj_dim=2, residual=True)
    q = torch.randn(2, 20, 3, 8, device=DEVICE).transpose(1, 2)  # (B, H, L, E) from (B, L, H, E): strided
    k = torch.randn(1, 3, 18, 8, device=DEVICE)  # shared by the batch
    v = torch.randn(2, 1, 18, 16, device=DEVICE)[..., ::2]  # shared by the heads, every other feature
    assert_matches_reference(q, k, v, score, make_mask("float", (20, 18)), is_causal=True, **BLOCKS_16)


def test_a_fresh_residual_score_is_dot_product_attention():
    """A residual score starts with its MLP's last layer at zero: the kernels then compute scaled dot-product
    attention, checked against minina's dot_product_attention, an independent reference; the last layer still gets
    its gradient (GELU: no unit is dead at init), as in the reference backend."""
    score = NeuralScore(16, residual=True, hidden="wide", activation="gelu").to(DEVICE)
    q, k, v = (torch.randn(2, 19, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = triton_neural_attention(q, k, v, score, is_causal=True, **BLOCKS_16)
    expected = dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected)
    d_out = torch.randn_like(out)
    last = score.linears()[-1].weight  # (1, h2), zero
    *grads, d_last = torch.autograd.grad(out, (q, k, v, last), d_out)
    for actual, wanted in zip(grads, torch.autograd.grad(expected, (q, k, v), d_out)):
        torch.testing.assert_close(actual, wanted)
    (expected_d_last,) = torch.autograd.grad(neural_attention(q, k, v, score, is_causal=True, backend="reference"),
                                             last, d_out)
    torch.testing.assert_close(d_last, expected_d_last)
    assert d_last.abs().min() > 1e-3  # the MLP's way out of dot-product attention


def test_residual_scores_are_supported_up_to_head_size_256():
    """The q k^T tile takes head sizes up to 256, as the value tile does; "auto" picks the kernels on CUDA."""
    q = torch.randn(4, 8, device=DEVICE)
    score = NeuralScore(8, residual=True).to(DEVICE)
    assert supports(q, q, score)
    if DEVICE == "cuda":
        assert choose_backend("auto", q, q, score) == "triton"
    q, wide = torch.randn(4, 320, device=DEVICE), NeuralScore(320, residual=True).to(DEVICE)
    assert supports(q, q[:, :8], NeuralScore(320).to(DEVICE)) and not supports(q, q[:, :8], wide)
    with pytest.raises(ValueError, match=r"residual scores .*head sizes up to 256, got q \(4, 320\)"):
        triton_neural_attention(q, q, q[:, :8], wide)


def test_bfloat16_is_refused_below_compute_capability_8(monkeypatch):
    """A T4 (sm_75) cannot compile Triton's bf16: supports() says no, so "auto" never picks it there."""
    monkeypatch.setattr(triton_kernels, "_compute_capability", lambda device: (7, 5))
    score = NeuralScore(8).to(DEVICE)
    q = torch.randn(4, 8, device=DEVICE)
    assert supports(q, q, score) and supports(q.half(), q.half(), score.half())
    assert not supports(q.bfloat16(), q.bfloat16(), score.bfloat16())
    with pytest.raises(TypeError, match=r"compute capability >= 8.0 for bfloat16.*torch.bfloat16.*capability 7.5"):
        triton_neural_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), score.bfloat16())
    if DEVICE == "cuda":
        assert choose_backend("auto", q.bfloat16(), q.bfloat16(), score.bfloat16()) == "chunked"


@pytest.mark.parametrize("launch, message", [
    (dict(block_m=8), "block_m must be a power of two of at least 16.*got 8"),
    (dict(block_n=48), "block_n must be a power of two of at least 16.*got 48"),
])
def test_bad_block_sizes_raise(launch, message):
    q = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        triton_neural_attention(q, q, q, NeuralScore(8).to(DEVICE), **launch)


def test_mask_offsets_past_two_to_the_31():
    """A mask row stride of 2^30 + 64: row 2 starts past 2^31 elements, where int32 offsets would wrap around.
    The storage is only reserved (torch.empty), three rows of it are written."""
    L, S, row_stride = 3, 20, 2 ** 30 + 64
    mask = torch.empty(row_stride * (L - 1) + S, dtype=torch.bool, device=DEVICE).as_strided((L, S), (row_stride, 1))
    mask.copy_(torch.rand(L, S, device=DEVICE) > 0.3)
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(1, n, 8, device=DEVICE) for n in (L, S, S))
    assert_matches_reference(q, k, v, score, mask, **BLOCKS_16)


def test_more_batch_heads_than_a_grid_axis_allows():
    """B*H = 65,600 > 65,535, the limit of CUDA's grid axes 1 and 2: the 1-D grid takes it."""
    if DEVICE == "cpu":
        pytest.skip("the interpreter has no grid limits and would run 65,600 programs one by one")
    score = lively_score(8, proj_dim=2)
    q, k, v = (torch.randn(2, 32800, 5, 8, device=DEVICE) for _ in range(3))
    assert_matches_reference(q, k, v, score, is_causal=True)


def test_autotuned_launch(monkeypatch):
    """The default GPU path: each kernel autotunes over the configs that fit and keeps the fastest. Without a GPU
    the interpreter runs it, timed by the wall clock instead of CUDA events."""
    if DEVICE == "cpu":
        def wall_clock(kernel_call, quantiles):
            start = time.perf_counter()
            kernel_call()
            return [time.perf_counter() - start] * len(quantiles)

        monkeypatch.setattr(triton_kernels, "_launch_config", lambda *args: None)
        for tuned in triton_kernels._TUNED.values():
            monkeypatch.setitem(tuned.__dict__, "do_bench", wall_clock)
    score = lively_score(16, proj_dim=4)  # h1 = 4: 4 of the 6 configs fit
    q, k, v = (torch.randn(1, 2, n, 16, device=DEVICE) for n in (41, 37, 37))
    assert_matches_reference(q, k, v, score, make_mask("bool", (41, 37)), is_causal=True)
    fitting = triton_kernels._fitting_configs(AUTOTUNE_CONFIGS, {}, H1P=4)
    assert len(fitting) == 4
    for tuned in triton_kernels._TUNED.values():
        assert tuned.best_config in fitting


def small_check():
    q, k, v = (torch.randn(1, 2, n, 8, device=DEVICE) for n in (20, 35, 35))
    assert_matches_reference(q, k, v, lively_score(8, proj_dim=4), make_mask("float", (20, 35)), True, **BLOCKS_16)


def test_the_packaged_self_test_reports_passes_and_failures(monkeypatch):
    """run_checks, what `bench --device cuda --check` runs, passes a sound kernel and reports a broken one."""
    lines = []
    assert triton_check.run_checks(DEVICE, [("small", small_check)], progress=lines.append) == (1, [])
    monkeypatch.setattr(triton_kernels, "LOG2E", 1.0)  # a bug: the kernels' softmax in base 2 instead of e
    passed, failures = triton_check.run_checks(DEVICE, [("small", small_check)], progress=lines.append)
    assert passed == 0 and [name for name, _ in failures] == ["small"] and "out: Tensor-likes are not close" in \
        failures[0][1]
    assert lines[0] == "passed small" and lines[1].startswith("FAILED small: AssertionError: out: Tensor-likes")


def test_the_gpu_check_list_covers_configs_and_dtypes_and_runs(monkeypatch):
    """The list `bench --check` runs on a GPU: every autotune config, the residual score, fp16 and bf16 (on compute
    capability 8.0 and up), the refused double backward; a few of its checks run here as they would there."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    checks = dict(triton_check.gpu_checks(torch.device(DEVICE)))
    configs = {"config {BLOCK_M}x{BLOCK_N}".format(**config.kwargs) for config in AUTOTUNE_CONFIGS}
    assert configs <= set(checks) and len(checks) > len(configs) + 20
    assert {"float16 L=1000 S=1100", "bfloat16 autocast L=1000 S=1100", "B*H = 65,600", "bfloat16 residual L=1000 "
            "S=1100", "residual autotuned L=300 S=257", "residual wide+gelu E=128 L=257 S=300"} <= set(checks)
    names = ["double backward raises", "strides and broadcast batch dims", "L=35 S=20 causal=True mask=bool",
             "residual L=20 S=35 causal=False mask=float"]
    chosen = [(name, checks[name]) for name in names]
    assert triton_check.run_checks(DEVICE, chosen, progress=lambda line: None) == (4, [])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no bf16
    assert not any("bfloat16" in name for name, _ in triton_check.gpu_checks(torch.device(DEVICE)))
