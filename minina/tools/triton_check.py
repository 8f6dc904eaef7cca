"""The self-test of the fused Triton kernels against the float64 reference, shipped inside the package.

`python -m minina bench --device cuda --check` runs `run_checks` on a GPU from any install (a wheel, Colab), no
source tree needed; tests/test_triton.py compares with the same functions in Triton's CPU interpreter, at smaller
sizes. A check runs `triton_neural_attention` forward and backward and compares the output and every gradient
(q, k, v, each score parameter) with `neural_attention(backend="reference")` in float64:
- float32 inputs: equal to fp32 precision (rtol 1e-4, atol 1e-5 of the largest value in play);
- float16 and bfloat16: flash-attention's rule, the kernels' error at most twice the error of the reference run
  in the same low precision (plus a hair).
"""
import copy
import traceback

import torch

from ..attention import neural_attention
from ..scores import NeuralScore
from ..scores import REJECTED_SCORE_OPTIONS
from .candidates import CandidateScore

NAMES = ["out", "dq", "dk", "dv"]


def _expect(condition, message):
    """An assert that `python -O` keeps: the self-test must check also where asserts are stripped."""
    if not condition:
        raise AssertionError(message)


def lively_score(head_dim, device="cpu", **options):
    """A NeuralScore with wide random parameters, so that ReLU units are alive and every gradient is non-zero; a
    CandidateScore when options name one the study rejected (learn_scale: the scale the kernels see folded)."""
    score = (CandidateScore if set(options) & set(REJECTED_SCORE_OPTIONS) else NeuralScore)(head_dim, **options)
    with torch.no_grad():
        for layer in [score.q_proj, score.k_proj, *score.linears()]:
            layer.weight.normal_(0.0, 1.5 / layer.in_features ** 0.5)
            layer.bias.normal_(0.0, 0.5)
    return score.to(device)


def make_mask(mask_kind, shape, device="cpu"):
    """None, a boolean mask (True = may attend) with its first row fully masked, or a float mask with some -inf."""
    if mask_kind is None:
        return None
    if mask_kind == "bool":
        mask = torch.rand(shape, device=device) > 0.3
        mask[..., :1, :] = False  # a query with nothing to attend: zero output, no NaN
        return mask
    return torch.randn(shape, device=device).masked_fill(torch.rand(shape, device=device) < 0.2, float("-inf"))


def reference_grads(q, k, v, score, attn_mask, is_causal, d_out):
    """Output and gradients (q, k, v, then every score parameter) of the reference backend in float64."""
    score64 = copy.deepcopy(score).double()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    out = neural_attention(*leaves, score64, mask64, is_causal=is_causal, backend="reference")
    return [out, *torch.autograd.grad(out, [*leaves, *score64.parameters()], d_out.double())]


def triton_grads(q, k, v, score, attn_mask, is_causal, d_out, **launch):
    """Output and gradients, as reference_grads, of the kernels (launch: block_m=..., or nothing to autotune)."""
    from ..triton_kernels import triton_neural_attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = triton_neural_attention(*leaves, score, attn_mask, is_causal=is_causal, **launch)
    return [out, *torch.autograd.grad(out, [*leaves, *score.parameters()], d_out)]


def assert_matches_reference(q, k, v, score, attn_mask=None, is_causal=False, **launch):
    """Output and every gradient of the kernels equal the float64 reference's to fp32 precision; returns them."""
    d_out = torch.randn(*torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]), q.shape[-2], v.shape[-1],
                        device=q.device, dtype=v.dtype)
    expected = reference_grads(q, k, v, score, attn_mask, is_causal, d_out)
    actual = triton_grads(q, k, v, score, attn_mask, is_causal, d_out, **launch)
    names = NAMES + [f"d {name}" for name, _ in score.named_parameters()]
    # fp32 sums over many pairs: absolute errors scale with the largest values in play (d b3 is 0 up to rounding)
    atol = 1e-5 * max([1.0] + [e.abs().max().item() for e in expected if e.numel()])
    for name, a, e in zip(names, actual, expected):
        _expect(a.shape == e.shape and a.dtype == q.dtype, f"{name}: {a.shape} {a.dtype}, expected {e.shape} "
                f"{q.dtype}")
        _expect(bool(torch.isfinite(a).all()), f"{name}: not finite")
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")
    return actual


def assert_error_at_most_twice_the_reference(names, actual, reference_low, expected, dtypes):
    """flash-attention's rule: the kernels' error against float64 is at most twice (plus a hair) the error of the
    reference backend run in the same low precision. As there, the float64 reference starts from the same rounded
    inputs, so rounding the inputs is no one's error."""
    for name, a, r, e, dtype in zip(names, actual, reference_low, expected, dtypes):
        _expect(a.dtype == dtype, f"{name}: dtype {a.dtype}, expected {dtype}")
        kernel_error, reference_error = (a.double() - e).abs().max(), (r.double() - e).abs().max()
        _expect(kernel_error <= 2 * reference_error + 1e-3 * e.abs().max(),
                f"{name}: error {kernel_error:.3g} against float64, more than twice the reference's "
                f"{reference_error:.3g}")


def assert_low_precision_within_the_rule(dtype, lengths, device, autocast=False, **score_options):
    """The paper-shaped kernels on float16 or bfloat16 inputs (autocast=True: the mix autocast gives, A in float32
    and keys and values in dtype) keep flash-attention's error rule on every output and gradient. score_options
    go to the NeuralScore (e.g. residual=True)."""
    L, S, device = *lengths, torch.device(device)
    score = lively_score(16, device, proj_dim=4, **score_options)
    q, k, v = (torch.randn(1, 2, n, 16, device=device) for n in (L, S, S))
    low = [t.to(dtype) for t in (q, k, v, torch.randn(1, 2, L, 16, device=device))]
    score_low = score if autocast else copy.deepcopy(score).to(dtype)
    expected = reference_grads(*low[:3], score_low, None, True, low[3])
    results = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().requires_grad_() for t in low[:3]]
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            out = neural_attention(*leaves, score_low, is_causal=True, backend=backend)
        results[backend] = [out, *torch.autograd.grad(out, [*leaves, *score_low.parameters()], low[3])]
    parameters = len(list(score_low.parameters()))
    dtypes = [dtype] * 4 + [torch.float32 if autocast else dtype] * parameters
    assert_error_at_most_twice_the_reference(NAMES + ["d score"] * parameters, results["triton"],
                                             results["reference"], expected, dtypes)


def gpu_checks(device):
    """(name, check) pairs run by `bench --check`: every autotune config, masks, causal, L != S, empty and long
    sequences, score shapes and activations, the residual score (its q k^T tile), strides and broadcasting, fp16
    and bf16 (plain and under autocast), a B*H beyond a CUDA grid axis, a deterministic backward, and the refused
    double backward."""
    from ..triton_kernels import AUTOTUNE_CONFIGS, _fits, triton_neural_attention

    def every_config(config):
        h1 = max(h for h in (1, 2, 4, 8, 16) if _fits(config, h))  # the widest score MLP the config is meant for
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        L, S = 2 * block_m + 11, 2 * block_n + 5
        q, k, v = (torch.randn(1, 1, n, d, device=device) for n, d in ((L, 16), (S, 16), (S, 24)))
        assert_matches_reference(q, k, v, lively_score(16, device, proj_dim=h1), make_mask("float", (L, S), device),
                                 is_causal=block_m != block_n, block_m=block_m, block_n=block_n,
                                 num_warps=config.num_warps, num_stages=config.num_stages)

    def masks(L, S, is_causal, mask_kind, **options):
        q, k, v = (torch.randn(1, 2, n, d, device=device) for n, d in ((L, 8), (S, 8), (S, 5)))
        mask = make_mask(mask_kind, (L, S) if mask_kind == "bool" else (1, 2, L, S), device)
        assert_matches_reference(q, k, v, lively_score(8, device, proj_dim=4, **options), mask, is_causal)

    def lengths(L, S, head_dim=64, **options):
        q, k, v = (torch.randn(1, 2, n, head_dim, device=device) for n in (L, S, S))
        assert_matches_reference(q, k, v, lively_score(head_dim, device, **options), make_mask("bool", (L, S), device),
                                 is_causal=True)

    def strides():
        q = torch.randn(2, 20, 3, 8, device=device).transpose(1, 2)  # (B, H, L, E) from (B, L, H, E)
        k = torch.randn(1, 3, 18, 8, device=device)  # shared by the batch
        v = torch.randn(2, 1, 18, 16, device=device)[..., ::2]  # shared by the heads, every other feature
        assert_matches_reference(q, k, v, lively_score(8, device, proj_dim=2), make_mask("float", (20, 18), device))

    def many_batch_heads():  # B*H = 65,600 > 65,535, the limit of CUDA's grid axes 1 and 2
        q, k, v = (torch.randn(2, 32800, 5, 8, device=device) for _ in range(3))
        assert_matches_reference(q, k, v, lively_score(8, device, proj_dim=2), is_causal=True)

    def deterministic():
        q, k, v, d_out = (torch.randn(1, 2, 257, 8, device=device) for _ in range(4))
        score = lively_score(8, device, proj_dim=4)
        first, second = (triton_grads(q, k, v, score, None, True, d_out) for _ in range(2))
        _expect(all(torch.equal(a, b) for a, b in zip(first, second)), "two backward passes differ")

    def double_backward_raises():
        q, k, v = (torch.randn(1, 1, 9, 8, device=device, requires_grad=True) for _ in range(3))
        out = triton_neural_attention(q, k, v, lively_score(8, device, proj_dim=2))
        try:
            torch.autograd.grad(out.sum(), q, create_graph=True)
        except RuntimeError:
            return
        raise AssertionError("a backward with create_graph=True ran without raising")

    checks = [(f"config {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}", lambda c=c: every_config(c))
              for c in AUTOTUNE_CONFIGS]
    checks += [(f"L={L} S={S} causal={causal} mask={mask_kind}", lambda a=(L, S, causal, mask_kind): masks(*a))
               for L, S in ((20, 35), (35, 20)) for causal in (False, True) for mask_kind in (None, "bool", "float")]
    checks += [(f"residual L={L} S={S} causal={causal} mask={mask_kind}",
                lambda a=(L, S, causal, mask_kind): masks(*a, residual=True))
               for L, S in ((20, 35), (35, 20)) for causal in (False, True) for mask_kind in ("bool", "float")]
    checks += [(f"autotuned L={L} S={S}", lambda a=(L, S): lengths(*a)) for L, S in ((300, 257), (257, 300), (0, 20),
                                                                                  (20, 0), (2048, 2048))]
    checks += [("d'=16", lambda: lengths(64, 64, 32, proj_dim=16)),
               ("gelu, hidden (6, 3)", lambda: lengths(70, 70, 16, proj_dim=4, hidden=(6, 3), activation="gelu")),
               ("learn_scale", lambda: lengths(70, 70, 16, proj_dim=4, learn_scale=True)),
               ("residual autotuned L=300 S=257", lambda: lengths(300, 257, residual=True)),
               ("residual wide+gelu E=128 L=257 S=300",
                lambda: lengths(257, 300, 128, residual=True, hidden="wide", activation="gelu")),
               ("strides and broadcast batch dims", strides), ("B*H = 65,600", many_batch_heads),
               ("deterministic backward", deterministic), ("double backward raises", double_backward_raises)]
    low = [torch.float16] + ([torch.bfloat16] if torch.cuda.get_device_capability(device) >= (8, 0) else [])
    checks += [(f"{str(dtype)[6:]}{' autocast' if mix else ''} L=1000 S=1100",
                lambda a=(dtype, mix): assert_low_precision_within_the_rule(a[0], (1000, 1100), device, a[1]))
               for dtype in low for mix in (False, True)]
    checks += [(f"{str(dtype)[6:]} residual L=1000 S=1100",
                lambda dtype=dtype: assert_low_precision_within_the_rule(dtype, (1000, 1100), device, residual=True))
               for dtype in low]
    return checks


def run_checks(device="cuda", checks=None, progress=print):
    """Run checks (default gpu_checks(device)) one by one; returns (number passed, [(name, failure text)]).

    progress(line) gets one line per check as it ends."""
    checks = gpu_checks(torch.device(device)) if checks is None else checks
    passed, failures = 0, []
    for name, check in checks:
        torch.manual_seed(0)
        try:
            check()
        except Exception as error:  # a failed check is a result to report, the next one still runs
            failures.append((name, traceback.format_exc()))
            progress(f"FAILED {name}: {type(error).__name__}: {(str(error).splitlines() or [''])[0]}")
        else:
            passed += 1
            progress(f"passed {name}")
    return passed, failures
