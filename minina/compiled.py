"""Neural attention from compiled tiles: chunked's algorithm, each tile's forward and backward fused by torch.compile.

The algorithm is minina.chunked's (FlashAttention-2, Dao 2023, Alg. 1 and 2, with the paper's pair MLP as the
score): online softmax over key blocks, the logsumexp saved, score tiles recomputed in backward. chunked runs a
few dozen PyTorch ops per (query block x key block) tile, each writing a (hidden, ..., block, block) tensor to
memory. Here one tile is plain elementwise PyTorch with the score MLP unrolled over its hidden units (each unit
its own (..., bl, bs) expression, each weight a scalar read from one flat tensor), and torch.compile(dynamic=False)
fuses it into a few C++ loops around the p @ v products: the paper's MLP costs about ten scalar operations per pair
and its hidden values never reach memory. Written as a matmul over the hidden dim, the MLP would become an
external matmul call between loops, and the fusion would be lost.

Stable shapes: each tile's inputs are cut into fresh contiguous tensors of the full block size, the last block
padded, and the tile masks padded keys by position; row / column offsets and causality reach it in a tensor, not
as Python values. So a configuration (batch dims, score MLP, dtype, masking, blocks) compiles once and then serves
every L and S; the blocks depend on the batch size, and only sequences shorter than a block pick a smaller one
(compiled_block_size). No (..., L, S) tensor is made, and nothing but the inputs, the output and the logsumexp is
saved for backward.

Every score option that chunked runs runs here too; float16/bfloat16 inputs run with float32 tiles, as chunked.
Caution: the first call of each configuration compiles, which is slow (README, Performance; Inductor's cache on
disk makes later processes faster), so "auto" takes this backend only from COMPILE_MIN_PAIRS on. A compile error
in the forward makes "auto" fall back to chunked; one in the backward (rare: both tiles use the same operations) is
raised. Differentiating twice (create_graph=True) raises. On CUDA it may work but is not tested (Triton's kernels
are the GPU path).
"""
import contextlib
import functools
import math
import os
import shutil
import warnings

import torch

from .activations import ACTIVATIONS
from .chunked import ChunkedNeuralAttention, check_block_sizes, first_order_backward, split_inputs

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
    try:
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python / platform"
        from torch._inductor.cpp_builder import get_cpp_compiler
        compiler = get_cpp_compiler()
    except Exception as error:  # no compiler (Windows, macOS may lack one) or an older torch without this API
        return f"cannot find torch.compile's C++ compiler ({type(error).__name__}: {error})"
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


def inside_torch_compile():
    """Whether an outer torch.compile is tracing this call (torch >= 2.3 can tell)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


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
    """Back through the unrolled MLP: dS (..., bl, bs) -> flat weight gradients, dA (h1, ..., bl), dBk (h1, ..., bs)."""
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
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        with torch._dynamo.config.patch(**{limit: len(_CONFIGS) + 8}):  # the name before torch 2.6
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


def _part(x, blocks):
    """The part of x under one tile, a view: blocks maps dims to (index, block size); the last is shorter."""
    for dim, (index, block) in blocks.items():
        x = x.narrow(dim, index * block, min(block, x.shape[dim] - index * block))
    return x


def _crop(tile, part):
    """tile without its padding: the corner of the shape of part."""
    return tile[tuple(slice(0, n) for n in part.shape)]


def _tile(x, blocks, value=0.0):
    """One tile of x: a new contiguous tensor of the full block sizes, padded with value past x's end, so that
    every tile has the same shape and strides (one compiled graph)."""
    part = _part(x, blocks)
    tile = x.new_full([blocks[d][1] if d in blocks else n for d, n in zip(range(-x.dim(), 0), x.shape)], value)
    _crop(tile, part).copy_(part)
    return tile


class _Tiles:
    """The inputs of CompiledNeuralAttention in the compute dtype, and the arguments of tile (i, j)."""

    def __init__(self, A, Bk, v, q_dot, k_dot, attn_mask, rest_params, is_causal, block_l, block_s):
        compute = torch.promote_types(v.dtype, torch.float32)  # fp32 accumulation for half and bfloat16
        self.L, self.S, self.is_causal, self.block_l, self.block_s = A.shape[-2], Bk.shape[-2], is_causal, block_l, \
            block_s
        self.A, self.Bk = A.movedim(-1, 0).to(compute), Bk.movedim(-1, 0).to(compute)  # (h1, ..., L), (h1, ..., S)
        self.v = v.to(compute)  # (..., S, Ev)
        self.q_dot, self.k_dot = (None, None) if q_dot is None else (q_dot.to(compute), k_dot.to(compute))
        self.mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(compute)
        self.weights = torch.cat([p.reshape(-1) for p in rest_params]).to(compute)  # W2, b2, ..., Wn, bn
        self.widths = (rest_params[0].shape[1], *[w.shape[0] for w in rest_params[::2]])  # (h1, h2, ..., 1)
        self.count_l, count_s = -(-self.L // block_l), -(-self.S // block_s)
        rows, cols = torch.meshgrid(torch.arange(self.count_l, device=v.device) * block_l,
                                    torch.arange(count_s, device=v.device) * block_s, indexing="ij")  # (nbl, nbs)
        self.offsets = torch.stack([rows, cols, torch.full_like(rows, self.S), torch.full_like(rows, is_causal)],
                                   -1)  # (nbl, nbs, 4): first query row, first key, S, is_causal

    def key_blocks(self, i):
        """The key blocks that query block i sees: all, or (causal) those starting at or before its last row."""
        stop = min(self.S, (i + 1) * self.block_l) if self.is_causal else self.S
        return range(-(-stop // self.block_s))

    def rows(self, i):
        return (i, self.block_l)

    def cols(self, j):
        return (j, self.block_s)

    def mask_blocks(self, i, j):
        """The blocks of the mask's last two dims for tile (i, j); a size-1 dim (broadcast) is not cut."""
        return {dim: block for dim, block in ((-2, self.rows(i)), (-1, self.cols(j))) if self.mask.shape[dim] > 1}

    def args(self, i, j):
        """A (h1, ..., bl), Bk (h1, ..., bs), v (..., bs, Ev), weights, offsets (4,), the mask tile or None, and the
        residual's q_dot (..., bl, E), k_dot (..., bs, E) or None."""
        rows, cols = {-2: self.rows(i)}, {-2: self.cols(j)}
        mask = None if self.mask is None else _tile(self.mask, self.mask_blocks(i, j))  # (..., bl|1, bs|1)
        return (_tile(self.A, {-1: self.rows(i)}), _tile(self.Bk, {-1: self.cols(j)}), _tile(self.v, cols),
                self.weights, self.offsets[i, j], mask,
                None if self.q_dot is None else _tile(self.q_dot, rows),
                None if self.k_dot is None else _tile(self.k_dot, cols))

    def config(self, kind, *options):
        """What the compiled tile specializes on: the shapes and dtypes of the tiles, and the options."""
        return (kind, *[None if t is None else (t.shape, t.dtype, t.device) for t in self.args(0, 0)], self.widths,
                *options)


class CompiledNeuralAttention(torch.autograd.Function):
    """ChunkedNeuralAttention with compiled tiles: the same arguments, results and gradients."""

    @staticmethod
    def forward(ctx, A, Bk, v, q_dot, k_dot, attn_mask, is_causal, activation, block_l, block_s, *rest_params):
        tiles = _Tiles(A, Bk, v, q_dot, k_dot, attn_mask, rest_params, is_causal, block_l, block_s)
        out = torch.zeros(*v.shape[:-2], tiles.L, v.shape[-1], dtype=tiles.v.dtype, device=v.device)  # (..., L, Ev)
        logsumexp = torch.zeros(out.shape[:-1], dtype=out.dtype, device=v.device)  # (..., L)
        forward_tile = _compiled("forward")
        with _compiling(tiles.config("forward", activation)):
            for i in range(tiles.count_l):
                row_max = torch.full((*v.shape[:-2], block_l), -math.inf, dtype=out.dtype, device=v.device)  # m_i
                row_sum = torch.zeros_like(row_max)  # l_i  (..., bl)
                acc = torch.zeros(*row_max.shape, v.shape[-1], dtype=out.dtype, device=v.device)  # (..., bl, Ev)
                for j in tiles.key_blocks(i):
                    row_max, row_sum, acc = forward_tile(*tiles.args(i, j), row_max, row_sum, acc, widths=tiles.widths,
                                                         activation=activation)
                has_keys = row_sum > 0  # a row with every key masked outputs zeros
                part = _part(out, {-2: tiles.rows(i)})  # (..., <= bl, Ev)
                part.copy_(_crop(acc / torch.where(has_keys, row_sum, 1.0).unsqueeze(-1), part))
                part = _part(logsumexp, {-1: tiles.rows(i)})
                part.copy_(_crop(torch.where(has_keys, row_max + torch.log(row_sum), -math.inf), part))
        ctx.save_for_backward(A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params)
        ctx.is_causal, ctx.activation, ctx.block_l, ctx.block_s = is_causal, activation, block_l, block_s
        return out.to(v.dtype)

    @staticmethod
    @first_order_backward("compiled")
    def backward(ctx, grad_out):
        A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params = ctx.saved_tensors
        tiles = _Tiles(A, Bk, v, q_dot, k_dot, attn_mask, rest_params, ctx.is_causal, ctx.block_l, ctx.block_s)
        grad_out = grad_out.to(out.dtype)  # (..., L, Ev)
        delta = (grad_out * out).sum(dim=-1)  # D_i = dO_i . O_i  (..., L)
        safe_lse = torch.where(torch.isfinite(logsumexp), logsumexp, math.inf)  # rows with no key: P = 0
        mask_grad = attn_mask is not None and ctx.needs_input_grad[5]
        grads = [None if t is None else torch.zeros(t.shape, dtype=out.dtype, device=v.device) for t in (
            tiles.A, tiles.Bk, tiles.v, tiles.weights, attn_mask if mask_grad else None, q_dot, k_dot)]
        backward_tile = _compiled("backward")
        with _compiling(tiles.config("backward", ctx.activation, mask_grad)):
            for i in range(tiles.count_l):
                rows = tiles.rows(i)
                row_tiles = (_tile(grad_out, {-2: rows}), _tile(delta, {-1: rows}),
                             _tile(safe_lse, {-1: rows}, math.inf))  # padded rows: dO = 0, D = 0, P = 0
                for j in tiles.key_blocks(i):
                    tile_grads = backward_tile(*tiles.args(i, j), *row_tiles, widths=tiles.widths,
                                               activation=ctx.activation, mask_grad=mask_grad)
                    cols = tiles.cols(j)
                    blocks = ({-1: rows}, {-1: cols}, {-2: cols}, {}, mask_grad and tiles.mask_blocks(i, j),
                              {-2: rows}, {-2: cols})  # where each tile gradient adds to
                    for grad, tile_grad, block in zip(grads, tile_grads, blocks):
                        if grad is not None:
                            part = _part(grad, block)
                            part += _crop(tile_grad, part)
        return _input_grads(ctx, *grads)


def _input_grads(ctx, grad_A, grad_Bk, grad_v, grad_weights, grad_mask, grad_q, grad_k):
    """The gradients in the shapes and dtypes of CompiledNeuralAttention.forward's inputs."""
    A, Bk, v, q_dot, k_dot, _, _, attn_mask, *rest_params = ctx.saved_tensors
    grad_rest = [g.view_as(p).to(p.dtype) for g, p in zip(grad_weights.split([p.numel() for p in rest_params]),
                                                            rest_params)]
    return (grad_A.movedim(0, -1).to(A.dtype), grad_Bk.movedim(0, -1).to(Bk.dtype), grad_v.to(v.dtype),
            None if grad_q is None else grad_q.to(q_dot.dtype), None if grad_k is None else grad_k.to(k_dot.dtype),
            None if grad_mask is None else grad_mask.to(attn_mask.dtype), None, None, None, None, *grad_rest)


def compiled_neural_attention(q, k, v, score, attn_mask=None, is_causal=False, *, block_l=None, block_s=None):
    """neural_attention(..., backend="compiled"): chunked's results and memory with each tile compiled.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev), masks as in neural_attention (which validates
    the tensors and dispatches here). block_l / block_s: query / key rows per tile (default: compiled_block_size);
    each new value compiles again. Raises CompileError if torch.compile fails.
    """
    check_block_sizes(block_l, block_s)
    A, Bk, v, q_dot, k_dot, attn_mask, rest_params = split_inputs(q, k, v, score, attn_mask)
    function = CompiledNeuralAttention if A.shape[-2] and Bk.shape[-2] else ChunkedNeuralAttention  # empty: no tile
    default = compiled_block_size(math.prod(v.shape[:-2]), max(A.shape[-2], Bk.shape[-2]))
    return function.apply(A, Bk, v, q_dot, k_dot, attn_mask, is_causal, score.activation, block_l or default,
                          block_s or default, *rest_params)
