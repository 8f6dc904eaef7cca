"""The functional core: dot-product and neural attention with the signature of F.scaled_dot_product_attention.

Shapes: q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); batch dimensions broadcast.
Masks follow SDPA: a boolean attn_mask is True where a query may attend, a float mask is added to the logits,
and either broadcasts to (..., L, S). is_causal keeps key j <= query i (top-left aligned, as SDPA); it may be
combined with attn_mask, and then a key must pass both.
A query row with no key it may attend to gets zero attention weights and so a zero output (SDPA's math path
would give NaN there).
Arguments after attn_mask are keyword-only: SDPA's fifth positional argument is dropout_p, ours would be
is_causal, so a call copied from SDPA must not silently mean something else.
"""
import functools
import inspect
import math

import torch
import torch.nn.functional as F

from .chunked import chunked_neural_attention
from .compiled import (CompileError, compiled_neural_attention, fallback_warning, inside_torch_compile, pays_off,
                       record_failure, unavailable_reason)
from .masks import attention_bias, masked_softmax
from .scores import NeuralScore

BACKENDS = ("auto", "reference", "chunked", "compiled", "triton")


def _no_positional(signature, args):
    """TypeError for arguments given by position after attn_mask (SDPA's 5th positional argument is dropout_p)."""
    if args:
        raise TypeError(f"{signature.split('(')[0]}() takes the arguments after attn_mask by keyword only, got "
                        f"{len(args)} more positional: write {signature}. F.scaled_dot_product_attention's 5th "
                        f"positional argument is dropout_p, so a call copied from SDPA would silently mean "
                        f"something else here")


def _documented_signature(function):
    """Show function's signature as documented, a bare * after attn_mask (help(), inspect.signature): its *args
    exists only to turn an SDPA-style positional call into _no_positional's TypeError. The function itself is
    unchanged (no wrapper frame)."""
    signature = inspect.signature(function)
    function.__signature__ = signature.replace(
        parameters=[p for p in signature.parameters.values() if p.kind != p.VAR_POSITIONAL])
    return function


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


def _weights(logits, attn_mask, is_causal):
    bias = attention_bias(attn_mask, is_causal, logits.shape[-2], logits.shape[-1], logits.dtype, logits.device)
    return masked_softmax(logits if bias is None else logits + bias)  # (..., L, S)


@_documented_signature
def dot_product_attention(q, k, v, attn_mask=None, *args, is_causal=False, scale=None):
    """softmax(q k^T * scale + mask) v, scale = 1/sqrt(E) by default (Vaswani et al. 2017, Eq. 1).

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). Written out as the readable reference that
    sdpa_attention (and F.scaled_dot_product_attention) computes fast; it keeps the (..., L, S) logits.
    """
    _no_positional("dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=...)", args)
    _check_inputs(q, k, v, attn_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    return _weights(logits, attn_mask, is_causal) @ v  # (..., L, Ev)


@_documented_signature
def sdpa_attention(q, k, v, attn_mask=None, *args, is_causal=False, scale=None):
    """dot_product_attention computed by F.scaled_dot_product_attention (PyTorch's fused kernels), same results.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). Adds minina's mask semantics to SDPA's:
    is_causal combines with attn_mask (SDPA refuses both), and rows with no key to attend give zeros. Those rows
    can only come from a mask, so only then are they attended as if unmasked and zeroed after the call, which
    keeps the output and every gradient finite.
    """
    _no_positional("sdpa_attention(q, k, v, attn_mask, is_causal=..., scale=...)", args)
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


def _check_score(score, q):
    if not isinstance(score, NeuralScore):
        raise TypeError(f"score must be a minina.NeuralScore, got {type(score).__name__}")
    if score.head_dim != q.shape[-1]:
        raise ValueError(f"score was built for head_dim {score.head_dim} but q has shape {tuple(q.shape)}")


def reference_neural_attention(q, k, v, score, attn_mask=None, is_causal=False):
    """The paper's way: build all L*S pair scores (memory O(L*S*P)), softmax over keys, times v."""
    return _weights(score.logits(q, k), attn_mask, is_causal) @ v  # (..., L, Ev)


def triton_neural_attention(q, k, v, score, attn_mask=None, is_causal=False):
    """The fused Triton kernels (minina.triton_kernels), imported only when used so minina works without triton."""
    try:
        from .triton_kernels import triton_neural_attention as fused
    except ImportError as error:
        raise ImportError(f"backend='triton' needs the triton package ({error}); install it (it comes with CUDA "
                          "builds of torch) or use backend='chunked'") from error
    return fused(q, k, v, score, attn_mask, is_causal)


_IMPLEMENTATIONS = {"reference": reference_neural_attention, "chunked": chunked_neural_attention,
                    "compiled": compiled_neural_attention, "triton": triton_neural_attention}


@functools.lru_cache(maxsize=None)
def _triton_imports():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(backend):
    """Raise ValueError unless backend names one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend, q, v=None, score=None, attn_mask=None):
    """The concrete backend name that `backend` means for tensors like q ("auto" picks the best available).

    "auto" is "triton" for CUDA tensors when triton imports and, if v and score are given, the kernels support
    them (minina.triton_kernels.supports). For CPU tensors it is "compiled" when v and score are given, the call is
    big enough for compiled tiles to pay off (minina.compiled.pays_off), torch.compile works here (not with
    MININA_COMPILE=0; without a C++ compiler or after a failed compile it warns once, naming the reason) and no
    outer torch.compile is tracing the call. "chunked" otherwise.
    """
    check_backend(backend)
    if backend != "auto":
        return backend
    if q.device.type == "cuda":
        if not _triton_imports():
            return "chunked"
        from .triton_kernels import supports
        return "triton" if v is None or score is None or supports(q, v, score, attn_mask) else "chunked"
    if q.device.type != "cpu" or v is None or score is None or not pays_off(q, v) or inside_torch_compile():
        return "chunked"  # inside an outer torch.compile, that compile fuses chunked's operations itself
    reason = unavailable_reason()
    if reason is None:
        return "compiled"
    if reason != "MININA_COMPILE=0":  # the user's own choice needs no warning
        fallback_warning(reason)
    return "chunked"


@_documented_signature
def neural_attention(q, k, v, score, attn_mask=None, *args, is_causal=False, backend="auto"):
    """softmax(s(q_i, k_j) + mask) v with s a NeuralScore (DiGiugno & Mahmood 2025, Eq. 3-5).

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev); the same masks as dot_product_attention.
    backend: "reference" materializes the (..., L, S, 2P) pair tensor as the paper does; "chunked" walks key
    blocks with an online softmax in O(L + S) memory (minina.chunked); "compiled" runs chunked's algorithm with
    each tile fused by torch.compile (minina.compiled, for CPUs); "triton" runs it as fused GPU kernels
    (minina.triton_kernels); "auto" picks the best backend available for q's device (see resolve_backend).
    """
    _no_positional("neural_attention(q, k, v, score, attn_mask, is_causal=..., backend=...)", args)
    _check_inputs(q, k, v, attn_mask)
    _check_score(score, q)
    name = resolve_backend(backend, q, v, score, attn_mask)
    if name == "compiled" and backend == "auto":
        try:
            return compiled_neural_attention(q, k, v, score, attn_mask, is_causal)
        except CompileError as error:  # from now on "auto" runs chunked, and says so once
            record_failure(str(error))
            name = "chunked"
    return _IMPLEMENTATIONS[name](q, k, v, score, attn_mask, is_causal)


@_documented_signature
def attention_weights(q, k, score=None, attn_mask=None, *args, is_causal=False, scale=None):
    """The (..., L, S) attention matrix: dot-product when score is None, else neural with that NeuralScore."""
    _no_positional("attention_weights(q, k, score, attn_mask, is_causal=..., scale=...)", args)
    _check_inputs(q, k, k, attn_mask)
    if score is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return _weights((q @ k.transpose(-2, -1)) * scale, attn_mask, is_causal)
    _check_score(score, q)
    return _weights(score.logits(q, k), attn_mask, is_causal)
