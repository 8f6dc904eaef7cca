"""Neural attention from compiled tiles: chunked's algorithm, each tile's forward and backward fused by torch.compile.

The algorithm is minina.chunked's (FlashAttention-2, Dao 2023, Alg. 1 and 2, with the paper's pair MLP as the
score): online softmax over key blocks, the logsumexp saved, score tiles recomputed in backward. chunked runs a
few dozen PyTorch ops per (query block x key block) tile, each writing a (hidden, ..., block, block) tensor to
memory. Here one tile is plain elementwise PyTorch with the score MLP unrolled over its hidden units (each unit
its own (..., bl, bs) expression, each weight a scalar read from one flat tensor), and torch.compile(dynamic=False)
fuses it into a few C++ loops around the p @ v products: the paper's MLP costs about ten scalar operations per pair
and its hidden values never reach memory. Written as a matmul over the hidden dim, the MLP would become an
external matmul call between loops, and the fusion would be lost.

Stable shapes: inputs are padded to whole blocks and cut into contiguous blocks (nb, ..., block, ...); the tile
masks padded keys by position, and row / column offsets and causality reach it in a tensor, not as Python values.
So a configuration (batch dims, score MLP, dtype, masking, blocks) compiles once and then serves every L and S;
the blocks depend on the batch size, and only sequences shorter than a block pick a smaller one
(compiled_block_size).

Tested against the reference on CPU in float32 and float64 with every score option of chunked (any hidden widths,
ReLU, GELU, leaky ReLU, learned scale, residual); float16/bfloat16 inputs run with float32 tiles, as chunked.
Caution: the first call of each configuration compiles (seconds; the inductor cache on disk makes later processes
faster), so "auto" takes this backend only above COMPILE_MIN_PAIRS; on CUDA it may work but is not tested.
"""
import contextlib
import functools
import math
import os
import shutil
import warnings

import torch

from .activations import ACTIVATIONS
from .chunked import ChunkedNeuralAttention, split_inputs

TILE_PAIRS = 2 ** 19  # default budget of (batch x query block x key block) pairs in one tile
COMPILE_MIN_PAIRS = 2 ** 17  # "auto" picks compiled on CPU from this many (batch x L x S) pairs on
_TILE_FUNCTIONS = {}  # "forward" / "backward" -> the torch.compile'd tile function
_CONFIGS = set()  # configurations compiled in this process
_FAILURE = []  # why compiling failed in this process, once it has
_WARNED = []  # the fallback reason "auto" warned about, once


def compiled_block_size(batch_size, length):
    """Square blocks, a power of two in [16, 256] with at most about TILE_PAIRS pairs per tile, and no longer than
    needed for sequences of `length` (rounded up to a power of two). So every length from the block size up
    shares one compiled configuration; shorter sequences add at most four more (16, 32, 64, 128)."""
    block = 16
    while block < min(256, length) and batch_size * (2 * block) ** 2 <= TILE_PAIRS:
        block *= 2
    return block


@functools.lru_cache(maxsize=None)
def _compiler_problem():
    """Why torch.compile cannot run here (None if it can): dynamo unsupported, or no C++ compiler for inductor."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python / platform"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        compiler = get_cpp_compiler()
    except Exception as error:  # Windows and macOS may lack one; a private API may move: either way, no compile
        return f"no C++ compiler for torch.compile ({type(error).__name__}: {error})"
    if shutil.which(compiler) is None:
        return f"no C++ compiler for torch.compile ({compiler!r} not found)"
    return None


def unavailable_reason():
    """Why "auto" must not pick this backend on CPU (None if it may): MININA_COMPILE=0, no compiler, or a failed
    compile earlier in this process."""
    if os.environ.get("MININA_COMPILE", "1") == "0":
        return "MININA_COMPILE=0"
    if _FAILURE:
        return _FAILURE[0]
    return _compiler_problem()


def pays_off(q, v):
    """Whether a call with these q (..., L, E) and v (..., S, Ev) is big enough for compiled tiles to beat chunked
    after their compile: at least COMPILE_MIN_PAIRS (batch x L x S) pairs."""
    batch = math.prod(torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]))
    return batch * q.shape[-2] * v.shape[-2] >= COMPILE_MIN_PAIRS


def _tile_logits(A, Bk, weights, offsets, mask, q_dot, k_dot, widths, activation):
    """Scores of one tile, unrolled: A (h1, ..., bl), Bk (h1, ..., bs) -> (..., bl, bs) and every layer's
    pre-activations (a list per layer of one (..., bl, bs) tensor per unit). Masked and padded pairs get -inf.

    weights: W2, b2, ..., Wn, bn flattened into one tensor; offsets: (first query row, first key, S, is_causal),
    a tensor, so that neither positions nor causality make a new compiled graph.
    """
    act = ACTIVATIONS[activation].function
    pre = [A[unit].unsqueeze(-1) + Bk[unit].unsqueeze(-2) for unit in range(widths[0])]  # A_i + Bk_j per unit
    pre_activations, start = [pre], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        weight = weights[start: start + fan_out * fan_in].view(fan_out, fan_in)  # (out, in)
        bias = weights[start + fan_out * fan_in: start + fan_out * (fan_in + 1)]  # (out,)
        start += fan_out * (fan_in + 1)
        hidden = [act(x) for x in pre]
        pre = [sum(weight[o, u] * hidden[u] for u in range(fan_in)) + bias[o] for o in range(fan_out)]
        pre_activations.append(pre)
    logits = pre[0]  # (..., bl, bs)
    if q_dot is not None:
        logits = logits + q_dot @ k_dot.transpose(-2, -1)  # + q_i . k_j / sqrt(E)
    rows = offsets[0] + torch.arange(logits.shape[-2], device=logits.device)  # (bl,) query positions
    cols = offsets[1] + torch.arange(logits.shape[-1], device=logits.device)  # (bs,) key positions
    keep = (cols < offsets[2]).expand(logits.shape[-2], -1)  # (bl, bs) real keys, not padding
    keep = keep & ((cols <= rows.unsqueeze(-1)) | (offsets[3] == 0))  # causal: key j <= query i
    if mask is not None and mask.dtype == torch.bool:
        keep = keep & mask
    elif mask is not None:
        logits = logits + mask
    return logits.masked_fill(~keep, -math.inf), pre_activations[:-1]


def _forward_tile(A, Bk, v, weights, offsets, mask, q_dot, k_dot, row_max, row_sum, acc, *, widths, activation):
    """One online-softmax step over a key block: (m_i, l_i, acc) -> updated, with v (..., bs, Ev)."""
    logits, _ = _tile_logits(A, Bk, weights, offsets, mask, q_dot, k_dot, widths, activation)
    new_max = torch.maximum(row_max, logits.amax(dim=-1))  # m_new = max(m_i, rowmax(S_ij))
    safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)  # a row masked so far stays at 0 weight
    rescale = torch.exp(row_max - safe_max)  # exp(m_i - m_new)
    p = torch.exp(logits - safe_max.unsqueeze(-1))  # P_ij = exp(S_ij - m_new)  (..., bl, bs)
    row_sum = row_sum * rescale + p.sum(dim=-1)  # l_i = l_i exp(m_i - m_new) + rowsum(P_ij)
    acc = acc * rescale.unsqueeze(-1) + p @ v  # (..., bl, Ev)
    return new_max, row_sum, acc


def _mlp_backward(grad_logits, pre_activations, weights, widths, activation):
    """Back through the unrolled MLP: dS (..., bl, bs) -> (flat weight gradients, dA (h1, ..., bl), dBk (h1, ..., bs))."""
    _, act, act_grad = ACTIVATIONS[activation]
    grads, pieces, end = [grad_logits], [], weights.shape[0]
    for fan_in, fan_out, pre in reversed(list(zip(widths[:-1], widths[1:], pre_activations))):
        start = end - fan_out * (fan_in + 1)
        weight = weights[start: start + fan_out * fan_in].view(fan_out, fan_in)  # (out, in)
        hidden = [act(x) for x in pre]
        grad_weight = [(grads[o] * hidden[u]).sum() for o in range(fan_out) for u in range(fan_in)]  # dW = g h^T
        pieces = [torch.stack(grad_weight), torch.stack([g.sum() for g in grads])] + pieces  # db = sum g
        grads = [sum(weight[o, u] * grads[o] for o in range(fan_out)) * act_grad(pre[u]) for u in range(fan_in)]
        end = start
    grad_A = torch.stack([g.sum(dim=-1) for g in grads])  # pre = A_i + Bk_j: dA_i = sum_j d(pre_ij)
    grad_Bk = torch.stack([g.sum(dim=-2) for g in grads])  # dBk_j = sum_i d(pre_ij)
    return torch.cat(pieces), grad_A, grad_Bk


def _backward_tile(A, Bk, v, weights, offsets, mask, q_dot, k_dot, grad_out, delta, logsumexp, *, widths,
                   activation, mask_grad):
    """FlashAttention-2's backward for one tile: the gradients of A, Bk, v, the flat weights, the mask tile (or
    None) and the residual's q_dot, k_dot (or None) contributed by these pairs."""
    logits, pre_activations = _tile_logits(A, Bk, weights, offsets, mask, q_dot, k_dot, widths, activation)
    p = torch.exp(logits - logsumexp.unsqueeze(-1))  # P_ij = exp(S_ij - LSE_i)  (..., bl, bs)
    grad_v = p.transpose(-2, -1) @ grad_out  # dV_j = P_ij^T dO_i  (..., bs, Ev)
    grad_p = grad_out @ v.transpose(-2, -1)  # dP_ij = dO_i V_j^T  (..., bl, bs)
    grad_logits = p * (grad_p - delta.unsqueeze(-1))  # dS_ij = P_ij (dP_ij - D_i)
    grad_mask = grad_logits.sum_to_size(mask.shape) if mask_grad else None
    grad_q = grad_k = None
    if q_dot is not None:  # S_ij += q_i . k_j
        grad_q, grad_k = grad_logits @ k_dot, grad_logits.transpose(-2, -1) @ q_dot  # (..., bl, E), (..., bs, E)
    grad_weights, grad_A, grad_Bk = _mlp_backward(grad_logits, pre_activations, weights, widths, activation)
    return grad_A, grad_Bk, grad_v, grad_weights, grad_mask, grad_q, grad_k


class CompileError(RuntimeError):
    """torch.compile failed on a tile; "auto" then falls back to chunked."""


def _compiled(kind):
    """The torch.compile'd tile function of kind "forward" or "backward" (made on first use)."""
    if kind not in _TILE_FUNCTIONS:
        _TILE_FUNCTIONS[kind] = torch.compile({"forward": _forward_tile, "backward": _backward_tile}[kind],
                                              dynamic=False)
    return _TILE_FUNCTIONS[kind]


@contextlib.contextmanager
def _compiling(config):
    """Around the tile calls of one configuration. The first time it compiles: each configuration is one more
    entry in the tile function's cache, which torch._dynamo caps (recompile_limit), so the cap is raised to fit;
    a failure is raised as CompileError."""
    if config in _CONFIGS:
        yield
        return
    try:
        with torch._dynamo.config.patch(recompile_limit=len(_CONFIGS) + 8):
            yield
    except Exception as error:
        raise CompileError(f"torch.compile failed on the compiled backend's {config[0]} tile: "
                           f"{type(error).__name__}: {str(error)[:500]}") from error
    _CONFIGS.add(config)


def fallback_warning(reason):
    """Warn, once per process, that "auto" runs chunked instead of compiled, and why."""
    if not _WARNED:
        _WARNED.append(reason)
        warnings.warn(f"neural_attention(backend='auto') runs 'chunked' on CPU, not the faster 'compiled': {reason}",
                      RuntimeWarning, stacklevel=3)


def record_failure(reason):
    """Remember that compiling failed here, so that "auto" stops picking this backend, and warn once."""
    _FAILURE.append(reason)
    fallback_warning(reason)


def _pad(x, dim, size, value, dtype):
    """x padded with value along dim to length size, as dtype."""
    padded = x.new_full((*x.shape[:dim], size, *x.shape[dim % x.dim() + 1:]), value, dtype=dtype)
    padded.narrow(dim, 0, x.shape[dim]).copy_(x)
    return padded


def _blocks(x, dim, block, dtype, value=0.0):
    """x padded along dim to whole blocks and cut: (..., n, ...) -> (nb, ..., block, ...), contiguous."""
    dim = dim % x.dim()
    count = -(-x.shape[dim] // block)
    return _pad(x, dim, count * block, value, dtype).unflatten(dim, (count, block)).movedim(dim, 0).contiguous()


def _unblock(blocks, dim, length):
    """The inverse of _blocks: (nb, ..., block, ...) -> (..., length, ...), dim counted in the result."""
    dim = dim % (blocks.dim() - 1)
    return blocks.movedim(0, dim).flatten(dim, dim + 1).narrow(dim, 0, length)


def _mask_blocks(mask, block_l, block_s, dtype):
    """A (..., L|1, S|1) mask cut into tiles (nbl|1, nbs|1, ..., bl|1, bs|1); size-1 dims stay size 1."""
    rows = _blocks(mask, -2, block_l, dtype) if mask.shape[-2] > 1 else mask.unsqueeze(0)  # (nbl|1, ..., bl|1, S|1)
    tiles = _blocks(rows, -1, block_s, dtype) if mask.shape[-1] > 1 else rows.unsqueeze(0)  # (nbs|1, nbl|1, ...)
    return tiles.transpose(0, 1).to(dtype).contiguous()  # (nbl|1, nbs|1, ..., bl|1, bs|1)


def _mask_unblock(tiles, shape):
    """The inverse of _mask_blocks, back to the mask's shape."""
    rows = _unblock(tiles.transpose(0, 1), -1, shape[-1]) if shape[-1] > 1 else tiles[:, 0]  # (nbl|1, ..., S|1)
    return _unblock(rows, -2, shape[-2]) if shape[-2] > 1 else rows[0]


class _Tiles:
    """The inputs of CompiledNeuralAttention cut into padded contiguous blocks, and the arguments of tile (i, j)."""

    def __init__(self, A, Bk, v, q_dot, k_dot, attn_mask, rest_params, is_causal, block_l, block_s):
        compute = torch.promote_types(v.dtype, torch.float32)  # fp32 accumulation for half and bfloat16
        self.L, self.S, self.is_causal, self.block_l, self.block_s = A.shape[-2], Bk.shape[-2], is_causal, block_l, \
            block_s
        self.A = _blocks(A.movedim(-1, 0), -1, block_l, compute)  # (nbl, h1, ..., bl)
        self.Bk = _blocks(Bk.movedim(-1, 0), -1, block_s, compute)  # (nbs, h1, ..., bs)
        self.v = _blocks(v, -2, block_s, compute)  # (nbs, ..., bs, Ev)
        self.q_dot = None if q_dot is None else _blocks(q_dot, -2, block_l, compute)  # (nbl, ..., bl, E)
        self.k_dot = None if k_dot is None else _blocks(k_dot, -2, block_s, compute)  # (nbs, ..., bs, E)
        mask_dtype = None if attn_mask is None or attn_mask.dtype == torch.bool else compute
        self.mask = None if attn_mask is None else _mask_blocks(attn_mask, block_l, block_s, mask_dtype or torch.bool)
        self.weights = torch.cat([p.reshape(-1) for p in rest_params]).to(compute)  # W2, b2, ..., Wn, bn
        self.widths = (rest_params[0].shape[1], *[w.shape[0] for w in rest_params[::2]])  # (h1, h2, ..., 1)
        starts = [torch.arange(len(blocks), device=v.device) * size for blocks, size in ((self.A, block_l),
                                                                                         (self.Bk, block_s))]
        rows, cols = torch.meshgrid(*starts, indexing="ij")  # (nbl, nbs) each
        self.offsets = torch.stack([rows, cols, torch.full_like(rows, self.S), torch.full_like(rows, is_causal)],
                                   -1)  # (nbl, nbs, 4): first query row, first key, S, is_causal

    def key_blocks(self, i):
        """The key blocks that query block i sees: all, or (causal) those starting at or before its last row."""
        stop = min(self.S, (i + 1) * self.block_l) if self.is_causal else self.S
        return range(-(-stop // self.block_s))

    def args(self, i, j):
        mask = None if self.mask is None else self.mask[min(i, len(self.mask) - 1), min(j, self.mask.shape[1] - 1)]
        return (self.A[i], self.Bk[j], self.v[j], self.weights, self.offsets[i, j], mask,
                None if self.q_dot is None else self.q_dot[i], None if self.k_dot is None else self.k_dot[j])

    def config(self, kind, *options):
        """What the compiled tile specializes on: every block's shape and dtype, and the options."""
        tensors = (self.A, self.Bk, self.v, self.q_dot, self.k_dot)
        mask = None if self.mask is None else (self.mask.shape[2:], self.mask.dtype)
        return (kind, *[None if t is None else (t.shape[1:], t.dtype, t.device) for t in tensors], mask,
                self.widths, *options)


class CompiledNeuralAttention(torch.autograd.Function):
    """ChunkedNeuralAttention with compiled tiles: the same arguments, results and gradients."""

    @staticmethod
    def forward(ctx, A, Bk, v, q_dot, k_dot, attn_mask, is_causal, activation, block_l, block_s, *rest_params):
        tiles = _Tiles(A, Bk, v, q_dot, k_dot, attn_mask, rest_params, is_causal, block_l, block_s)
        batch, compute = v.shape[:-2], tiles.v.dtype
        out = torch.zeros(len(tiles.A), *batch, block_l, v.shape[-1], dtype=compute, device=v.device)  # (nbl, ..., bl, Ev)
        logsumexp = torch.full(out.shape[:-1], -math.inf, dtype=compute, device=v.device)  # (nbl, ..., bl)
        forward_tile = _compiled("forward")
        with _compiling(tiles.config("forward", activation)):
            for i in range(len(tiles.A)):
                row_max = torch.full(out.shape[1:-1], -math.inf, dtype=compute, device=v.device)  # m_i (..., bl)
                row_sum = torch.zeros_like(row_max)  # l_i
                acc = torch.zeros_like(out[i])  # (..., bl, Ev)
                for j in tiles.key_blocks(i):
                    row_max, row_sum, acc = forward_tile(*tiles.args(i, j), row_max, row_sum, acc, widths=tiles.widths,
                                                         activation=activation)
                has_keys = row_sum > 0  # a row with every key masked outputs zeros
                out[i] = acc / torch.where(has_keys, row_sum, 1.0).unsqueeze(-1)
                logsumexp[i] = torch.where(has_keys, row_max + torch.log(row_sum), -math.inf)
        out, logsumexp = _unblock(out, -2, tiles.L), _unblock(logsumexp, -1, tiles.L)  # (..., L, Ev), (..., L)
        ctx.save_for_backward(A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params)
        ctx.is_causal, ctx.activation, ctx.block_l, ctx.block_s = is_causal, activation, block_l, block_s
        return out.to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params = ctx.saved_tensors
        tiles = _Tiles(A, Bk, v, q_dot, k_dot, attn_mask, rest_params, ctx.is_causal, ctx.block_l, ctx.block_s)
        delta = _blocks((grad_out.to(out.dtype) * out).sum(dim=-1), -1, ctx.block_l, out.dtype)  # D_i = dO_i . O_i
        safe_lse = torch.where(torch.isfinite(logsumexp), logsumexp, math.inf)  # rows with no key: P = 0
        safe_lse = _blocks(safe_lse, -1, ctx.block_l, out.dtype, value=math.inf)  # (nbl, ..., bl); padding: P = 0
        grad_out = _blocks(grad_out, -2, ctx.block_l, out.dtype)  # (nbl, ..., bl, Ev); padded rows 0
        mask_grad = attn_mask is not None and ctx.needs_input_grad[5]
        grads = [torch.zeros_like(t) for t in (tiles.A, tiles.Bk, tiles.v, tiles.weights)]
        grad_mask = torch.zeros_like(tiles.mask) if mask_grad else None
        grad_dot = None if q_dot is None else (torch.zeros_like(tiles.q_dot), torch.zeros_like(tiles.k_dot))
        backward_tile = _compiled("backward")
        with _compiling(tiles.config("backward", ctx.activation, mask_grad)):
            for i in range(len(tiles.A)):
                for j in tiles.key_blocks(i):
                    grad_A, grad_Bk, grad_v, grad_weights, grad_mask_tile, grad_q, grad_k = backward_tile(
                        *tiles.args(i, j), grad_out[i], delta[i], safe_lse[i], widths=tiles.widths,
                        activation=ctx.activation, mask_grad=mask_grad)
                    grads[0][i] += grad_A
                    grads[1][j] += grad_Bk
                    grads[2][j] += grad_v
                    grads[3] += grad_weights
                    if mask_grad:
                        grad_mask[min(i, len(grad_mask) - 1), min(j, grad_mask.shape[1] - 1)] += grad_mask_tile
                    if grad_dot is not None:
                        grad_dot[0][i] += grad_q
                        grad_dot[1][j] += grad_k
        return _input_grads(ctx, tiles, grads, grad_mask, grad_dot)


def _input_grads(ctx, tiles, grads, grad_mask, grad_dot):
    """The blocked gradients back in the shapes and dtypes of CompiledNeuralAttention.forward's inputs."""
    A, Bk, v, q_dot, k_dot, _, _, attn_mask, *rest_params = ctx.saved_tensors
    grad_A = _unblock(grads[0], -1, tiles.L).movedim(0, -1).to(A.dtype)  # (..., L, h1)
    grad_Bk = _unblock(grads[1], -1, tiles.S).movedim(0, -1).to(Bk.dtype)  # (..., S, h1)
    grad_v = _unblock(grads[2], -2, tiles.S).to(v.dtype)  # (..., S, Ev)
    grad_rest = [g.view_as(p).to(p.dtype) for g, p in zip(grads[3].split([p.numel() for p in rest_params]),
                                                            rest_params)]
    grad_mask = None if grad_mask is None else _mask_unblock(grad_mask, attn_mask.shape).to(attn_mask.dtype)
    grad_q = grad_k = None
    if grad_dot is not None:
        grad_q, grad_k = (_unblock(g, -2, n).to(t.dtype) for g, n, t in ((grad_dot[0], tiles.L, q_dot),
                                                                         (grad_dot[1], tiles.S, k_dot)))
    return grad_A, grad_Bk, grad_v, grad_q, grad_k, grad_mask, None, None, None, None, *grad_rest


def compiled_neural_attention(q, k, v, score, attn_mask=None, is_causal=False, *, block_l=None, block_s=None):
    """neural_attention(..., backend="compiled"): chunked's results and memory with each tile compiled.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev), masks as in neural_attention (which validates
    the tensors and dispatches here). block_l / block_s: query / key rows per tile (default: compiled_block_size);
    each new value compiles again. Raises CompileError if torch.compile fails.
    """
    for name, block in (("block_l", block_l), ("block_s", block_s)):
        if block is not None and (not isinstance(block, int) or block < 1):
            raise ValueError(f"{name} must be a positive int or None, got {block!r}")
    A, Bk, v, q_dot, k_dot, attn_mask, rest_params = split_inputs(q, k, v, score, attn_mask)
    function = CompiledNeuralAttention if A.shape[-2] and Bk.shape[-2] else ChunkedNeuralAttention  # empty: no tile
    default = compiled_block_size(math.prod(v.shape[:-2]), max(A.shape[-2], Bk.shape[-2]))
    return function.apply(A, Bk, v, q_dot, k_dot, attn_mask, is_causal, score.activation, block_l or default,
                          block_s or default, *rest_params)
