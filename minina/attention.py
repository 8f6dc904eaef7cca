"""The functional core: dot-product and neural attention with the signature of F.scaled_dot_product_attention.

Shapes: q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); batch dimensions broadcast.
Masks follow SDPA: a boolean attn_mask is True where a query may attend, a float mask is added to the logits,
and either broadcasts to (..., L, S). is_causal keeps key j <= query i (top-left aligned, as SDPA); it may be
combined with attn_mask, and then a key must pass both.
A query row with no key it may attend to gets zero attention weights and so a zero output (SDPA's math path
would give NaN there).
Arguments after attn_mask are keyword-only: SDPA's fifth positional argument is dropout_p, ours would be
is_causal, so a call copied from SDPA raises a TypeError instead of silently meaning something else.
"""
import importlib.util
import math

import torch
import torch.nn.functional as F

from .chunked import chunked_neural_attention, compiled_neural_attention
from .masks import attention_bias, masked_softmax
from .scores import NeuralScore

BACKENDS = ("auto", "reference", "chunked", "compiled", "triton")


def dot_product_attention(q, k, v, attn_mask=None, *, is_causal=False, scale=None):
    """softmax(q k^T * scale + mask) v, scale = 1/sqrt(E) by default (Vaswani et al. 2017, Eq. 1).

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). Written out as the readable reference that
    sdpa_attention (and F.scaled_dot_product_attention) computes fast; it keeps the (..., L, S) logits.
    """
    _check_inputs(q, k, v, attn_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    return _weights(logits, attn_mask, is_causal) @ v  # (..., L, Ev)


def sdpa_attention(q, k, v, attn_mask=None, *, is_causal=False, scale=None):
    """dot_product_attention computed by F.scaled_dot_product_attention (PyTorch's fused kernels), same results.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). Adds minina's mask semantics to SDPA's:
    is_causal combines with attn_mask (SDPA refuses both), and rows with no key to attend give zeros. Those rows
    can only come from a mask, so only then are they attended as if unmasked and zeroed after the call, which
    keeps the output and every gradient finite.
    """
    _check_inputs(q, k, v, attn_mask)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = q.expand(*batch, *q.shape[-2:]), k.expand(*batch, *k.shape[-2:]), v.expand(*batch, *v.shape[-2:])
    L, S = q.shape[-2], k.shape[-2]
    if S == 0:
        return q.new_zeros(*batch, L, v.shape[-1])
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)  # (..., L, Ev)
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()  # (L, S) key j <= query i
        attn_mask = attn_mask & causal if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~causal, -math.inf)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf
    has_key = allowed.any(dim=-1, keepdim=True)  # (..., L, 1)
    if attn_mask.dtype == torch.bool:
        attn_mask = attn_mask | ~has_key
    else:
        attn_mask = attn_mask.masked_fill(~has_key, 0.0).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)  # (..., L, Ev)
    return out.masked_fill(~has_key, 0.0)


def neural_attention(q, k, v, score, attn_mask=None, *, is_causal=False, backend="auto"):
    """softmax(s(q_i, k_j) + mask) v with s a NeuralScore (DiGiugno & Mahmood 2025, Eq. 3-5).

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); the same masks as dot_product_attention.
    backend: "reference" materializes the (..., L, S, 2P) pair tensor as the paper does; "chunked" walks
    (query block x key block) tiles with an online softmax in O(L + S) memory (minina.chunked); "compiled" runs
    chunked with each tile fused by torch.compile (for CPUs; its first call per configuration compiles);
    "triton" runs it as fused GPU kernels (minina.triton_kernels); "auto" is choose_backend's pick.
    """
    _check_inputs(q, k, v, attn_mask)
    _check_score(score, q)
    backend = choose_backend(backend, q, v, score, attn_mask)
    if backend == "reference":  # the paper's way: all L * S pair scores, memory O(L * S * P)
        return _weights(score.logits(q, k), attn_mask, is_causal) @ v  # (..., L, Ev)
    if backend == "chunked":
        return chunked_neural_attention(q, k, v, score, attn_mask, is_causal=is_causal)
    if backend == "compiled":
        return compiled_neural_attention(q, k, v, score, attn_mask, is_causal=is_causal)
    return _triton_kernels().triton_neural_attention(q, k, v, score, attn_mask, is_causal=is_causal)


def attention_weights(q, k, score=None, attn_mask=None, *, is_causal=False, scale=None):
    """The (..., L, S) attention matrix: dot-product when score is None, else neural with that NeuralScore."""
    _check_inputs(q, k, k, attn_mask)
    if score is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _weights((q @ k.transpose(-2, -1)) * scale, attn_mask, is_causal)
    _check_score(score, q)
    return _weights(score.logits(q, k), attn_mask, is_causal)


def choose_backend(backend, q, v, score, attn_mask=None):
    """The backend a neural_attention call runs: `backend` itself, or for "auto" the fused Triton kernels when q is
    on a CUDA device and they take these inputs (minina.triton_kernels.supports), and "chunked" everywhere else.

    "auto" never picks "compiled": its first call per configuration compiles for tens of seconds, more than it
    saves in the calls of a notebook-sized run (docs/performance.md measures both); choose it by name for long
    CPU runs. The answer depends on the arguments and the machine only.
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    if q.device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        if _triton_kernels().supports(q, v, score, attn_mask):
            return "triton"
    return "chunked"


def check_backend(backend):
    """Raise ValueError unless backend names one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _triton_kernels():
    """minina.triton_kernels, imported only when used, so that minina works without triton (macOS, Windows)."""
    try:
        import minina.triton_kernels as triton_kernels
    except ImportError as error:
        raise ImportError(f"backend='triton' needs the triton package ({error}); install it (it comes with CUDA "
                          "builds of torch) or use backend='chunked'") from error
    return triton_kernels


def _weights(logits, attn_mask, is_causal):
    bias = attention_bias(attn_mask, is_causal, logits.shape[-2], logits.shape[-1], logits.dtype, logits.device)
    return masked_softmax(logits if bias is None else logits + bias)  # (..., L, S)


def _check_inputs(q, k, v, attn_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., seq, features) with at least 2 dims, got {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or not q.is_floating_point():
        raise TypeError(f"q, k, v must share one floating dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the feature size E: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share the key length S: k {tuple(k.shape)}, v {tuple(v.shape)}")
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dims of q, k, v do not broadcast: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}") from None
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = may attend) or floating (added to logits), "
                        f"got {attn_mask.dtype}")
    target = (*batch, q.shape[-2], k.shape[-2])
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (..., L, S) = {target}")


def _check_score(score, q):
    if not isinstance(score, NeuralScore):
        raise TypeError(f"score must be a minina.NeuralScore, got {type(score).__name__}")
    if score.head_dim != q.shape[-1]:
        raise ValueError(f"score was built for head_dim {score.head_dim} but q has shape {tuple(q.shape)}")
