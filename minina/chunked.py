"""Memory-efficient neural attention: online softmax over key blocks, score tiles recomputed in backward.

The algorithm is FlashAttention's (Dao et al. 2022; Dao 2023, Alg. 1 and 2) with the dot product replaced by the
paper's pair MLP (DiGiugno & Mahmood 2025, Eq. 3-5). ChunkedNeuralAttention walks (query block x key block) tiles
and runs minina.tiles' forward and backward step on each: the (..., L, S, 2P) pair tensor of the reference never
exists, memory is O(batch * (L + S) * (E + h1)) plus one tile, and only the output and the per-query logsumexp
are saved for backward. Gradients of q, k, the projections and the first MLP layer flow through
NeuralScore.split by ordinary autograd. This is the readable blueprint of the fused Triton kernels.

backend="chunked" runs each tile step eagerly: a few dozen PyTorch ops per tile, each writing a (..., bl, bs)
tensor, so it trades speed for memory. backend="compiled" runs the same steps fused by torch.compile (Inductor's
C++ loops on a CPU): each tile's inputs are cut into fresh contiguous tensors of the full block size, the last one
padded (the tile masks padding by position), so one configuration (batch dims, score MLP, dtype, mask kind,
blocks) compiles once and then serves every L and S. Every NeuralScore option runs in both; float16/bfloat16
inputs run with float32 tiles and accumulators.
Caution: the first "compiled" call of a configuration compiles, which takes seconds to a minute
(docs/performance.md); torch.compile keeps at most torch._dynamo.config.recompile_limit configurations per process
(more run eagerly, with torch's warning); a compile that waits on a file lock gives up after
TORCHINDUCTOR_FILE_LOCK_TIMEOUT seconds and raises CompileError. Differentiating twice (create_graph=True) raises.
"""
import math

import torch

from .tiles import backward_tile, first_order_backward, forward_tile, split_inputs

TILE_ELEMENTS = 2 ** 19  # eager: budget of (hidden, batch, query block, key block) numbers in one tile
TILE_PAIRS = 2 ** 19  # compiled: budget of (batch, query block, key block) pairs in one tile


def default_block_size(batch_size, hidden_width, L, S):
    """Eager tiles: square blocks, a power of two in [16, 256], so that a tile holds at most about TILE_ELEMENTS
    numbers, and no longer than the sequences."""
    block = 16
    while block < 256 and batch_size * (2 * block) ** 2 * hidden_width <= TILE_ELEMENTS:
        block *= 2
    return min(block, max(L, S, 1))


def compiled_block_size(batch_size, length):
    """Compiled tiles: square blocks, a power of two in [16, 256] with at most about TILE_PAIRS pairs per tile, and
    no longer than needed for sequences of `length` (rounded up to a power of two). So every length from the block
    size up shares one compiled configuration; shorter sequences add at most four more (16, 32, 64, 128)."""
    block = 16
    while block < min(256, length) and batch_size * (2 * block) ** 2 <= TILE_PAIRS:
        block *= 2
    return block


def check_block_sizes(block_l, block_s):
    """ValueError unless each tile size is None (the default) or a positive int."""
    for name, block in (("block_l", block_l), ("block_s", block_s)):
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"{name} must be a positive int or None, got {block!r}")


class CompileError(RuntimeError):
    """torch.compile failed on a tile of backend="compiled"."""


def _steps(compiled):
    """The forward and backward tile steps, eager or compiled. torch.compile keeps its graphs with the function's
    code, so a new wrapper per call finds what an earlier call compiled."""
    if not compiled:
        return forward_tile, backward_tile
    return torch.compile(forward_tile, dynamic=False), torch.compile(backward_tile, dynamic=False)


def _run(compiled, kind, step, *args, **options):
    """step(*args, **options), a compile failure raised as CompileError."""
    if not compiled:
        return step(*args, **options)
    try:
        return step(*args, **options)
    except Exception as error:
        raise CompileError(f"torch.compile failed on backend='compiled''s {kind} tile: "
                           f"{type(error).__name__}: {str(error)[:500]}") from error


def _part(x, blocks):
    """The part of x under one tile, a view: blocks maps dims to (index, block size); the last is shorter."""
    for dim, (index, block) in blocks.items():
        x = x.narrow(dim, index * block, min(block, x.shape[dim] - index * block))
    return x


def _crop(tile, part):
    """tile without its padding: the corner of the shape of part."""
    return tile[tuple(slice(0, n) for n in part.shape)]


def _padded(x, blocks, value=0.0):
    """One tile of x as a new contiguous tensor of the full block sizes, padded with value past x's end, so that
    every tile has the same shape and strides (one compiled graph)."""
    part = _part(x, blocks)
    tile = x.new_full([blocks[d][1] if d in blocks else n for d, n in zip(range(-x.dim(), 0), x.shape)], value)
    _crop(tile, part).copy_(part)
    return tile


class _Tiles:
    """The inputs in the compute dtype, hidden-first, and the arguments of tile (i, j): views, or padded copies
    when compiled."""

    def __init__(self, inputs, widths, is_causal, block_l, block_s, compiled):
        A, Bk, v, q_residual, k_residual, attn_mask, weights = inputs
        compute = torch.promote_types(v.dtype, torch.float32)  # fp32 accumulation for half and bfloat16
        self.L, self.S, self.widths, self.is_causal = A.shape[-2], Bk.shape[-2], widths, is_causal
        self.block_l, self.block_s, self.compiled = block_l, block_s, compiled
        self.cut = _padded if compiled else _part
        self.A, self.Bk = A.movedim(-1, 0).to(compute), Bk.movedim(-1, 0).to(compute)  # (h1, ..., L), (h1, ..., S)
        self.v, self.weights = v.to(compute), weights.to(compute)  # (..., S, Ev), (n,)
        self.q_residual = None if q_residual is None else q_residual.to(compute)  # (..., L, E)
        self.k_residual = None if k_residual is None else k_residual.to(compute)  # (..., S, E)
        self.mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(compute)
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

    def positions(self, i, j):
        """Whether tile (i, j) masks by position: always when compiled (padding, one graph), else where it reaches
        above the causal diagonal."""
        return self.compiled or (self.is_causal and (j + 1) * self.block_s - 1 > i * self.block_l)

    def mask_blocks(self, i, j):
        """The blocks of the mask's last two dims for tile (i, j); a size-1 dim (broadcast) is not cut."""
        return {dim: block for dim, block in ((-2, self.rows(i)), (-1, self.cols(j))) if self.mask.shape[dim] > 1}

    def args(self, i, j):
        """A (h1, ..., bl), Bk (h1, ..., bs), v (..., bs, Ev), weights, offsets (4,), the mask tile or None, and the
        residual's q (..., bl, E), k (..., bs, E) or None."""
        rows, cols = {-2: self.rows(i)}, {-2: self.cols(j)}
        mask = None if self.mask is None else self.cut(self.mask, self.mask_blocks(i, j))  # (..., bl|1, bs|1)
        return (self.cut(self.A, {-1: self.rows(i)}), self.cut(self.Bk, {-1: self.cols(j)}), self.cut(self.v, cols),
                self.weights, self.offsets[i, j], mask,
                None if self.q_residual is None else self.cut(self.q_residual, rows),
                None if self.k_residual is None else self.cut(self.k_residual, cols))


class ChunkedNeuralAttention(torch.autograd.Function):
    """out = softmax(MLP(act(A_i + Bk_j)) [+ q_i . k_j] + mask) v, walked tile by tile; saves the logsumexp.

    Takes the seven TileInputs, then the MLP widths after its split layer, the activation's name, is_causal, the
    block sizes, and whether to compile the tile steps.
    """

    @staticmethod
    def forward(ctx, A, Bk, v, q_residual, k_residual, attn_mask, weights, widths, activation, is_causal, block_l,
                block_s, compiled):
        inputs = (A, Bk, v, q_residual, k_residual, attn_mask, weights)
        tiles = _Tiles(inputs, widths, is_causal, block_l, block_s, compiled)
        out = torch.zeros(*v.shape[:-2], tiles.L, v.shape[-1], dtype=tiles.v.dtype, device=v.device)  # (..., L, Ev)
        logsumexp = torch.zeros(out.shape[:-1], dtype=out.dtype, device=v.device)  # (..., L)
        step = _steps(compiled)[0]
        for i in range(tiles.count_l):
            out_rows = _part(out, {-2: tiles.rows(i)})  # (..., <= bl, Ev)
            shape = (*v.shape[:-2], block_l if compiled else out_rows.shape[-2])
            row_max = torch.full(shape, -math.inf, dtype=out.dtype, device=v.device)  # m_i  (..., bl)
            row_sum = torch.zeros_like(row_max)  # l_i  (..., bl)
            acc = torch.zeros(*shape, v.shape[-1], dtype=out.dtype, device=v.device)  # (..., bl, Ev)
            for j in tiles.key_blocks(i):
                row_max, row_sum, acc = _run(compiled, "forward", step, *tiles.args(i, j), row_max, row_sum, acc,
                                             widths=widths, activation=activation, positions=tiles.positions(i, j))
            has_keys = row_sum > 0  # a row with every key masked outputs zeros
            out_rows.copy_(_crop(acc / torch.where(has_keys, row_sum, 1.0).unsqueeze(-1), out_rows))
            lse_rows = _part(logsumexp, {-1: tiles.rows(i)})
            lse_rows.copy_(_crop(torch.where(has_keys, row_max + torch.log(row_sum), -math.inf), lse_rows))
        ctx.save_for_backward(*inputs, out, logsumexp)
        ctx.options = widths, activation, is_causal, block_l, block_s, compiled
        ctx.backend = "compiled" if compiled else "chunked"
        return out.to(v.dtype)

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_out):
        *inputs, out, logsumexp = ctx.saved_tensors
        widths, activation, is_causal, block_l, block_s, compiled = ctx.options
        tiles = _Tiles(inputs, widths, is_causal, block_l, block_s, compiled)
        grad_out = grad_out.to(out.dtype)  # (..., L, Ev)
        delta = (grad_out * out).sum(dim=-1)  # D_i = dO_i . O_i  (..., L)
        safe_lse = torch.where(torch.isfinite(logsumexp), logsumexp, math.inf)  # rows with no key: P = 0
        mask_grad = tiles.mask is not None and ctx.needs_input_grad[5]
        grads = [None if t is None else torch.zeros(t.shape, dtype=out.dtype, device=out.device) for t in (
            tiles.A, tiles.Bk, tiles.v, tiles.weights, tiles.mask if mask_grad else None, tiles.q_residual,
            tiles.k_residual)]
        step = _steps(compiled)[1]
        for i in range(tiles.count_l):
            rows = tiles.rows(i)
            row_tiles = (tiles.cut(grad_out, {-2: rows}), tiles.cut(delta, {-1: rows}),
                         _padded(safe_lse, {-1: rows}, math.inf) if compiled else _part(safe_lse, {-1: rows}))
            for j in tiles.key_blocks(i):  # padded rows: dO = 0, D = 0, P = 0
                tile_grads = _run(compiled, "backward", step, *tiles.args(i, j), *row_tiles, widths=widths,
                                  activation=activation, positions=tiles.positions(i, j), mask_grad=mask_grad)
                cols = tiles.cols(j)
                blocks = ({-1: rows}, {-1: cols}, {-2: cols}, {}, mask_grad and tiles.mask_blocks(i, j),
                          {-2: rows}, {-2: cols})  # where each tile gradient adds to
                for grad, tile_grad, block in zip(grads, tile_grads, blocks):
                    if grad is not None:
                        part = _part(grad, block)
                        part += _crop(tile_grad, part)
        A, Bk, v, q_residual, k_residual, attn_mask, weights = inputs
        grad_A, grad_Bk, grad_v, grad_weights, grad_mask, grad_q, grad_k = grads
        return (grad_A.movedim(0, -1).to(A.dtype), grad_Bk.movedim(0, -1).to(Bk.dtype), grad_v.to(v.dtype),
                None if grad_q is None else grad_q.to(q_residual.dtype),
                None if grad_k is None else grad_k.to(k_residual.dtype),
                None if grad_mask is None else grad_mask.to(attn_mask.dtype), grad_weights.to(weights.dtype),
                None, None, None, None, None, None)


def chunked_neural_attention(q, k, v, score, attn_mask=None, *, is_causal=False, block_l=None, block_s=None):
    """neural_attention(..., backend="chunked"): the reference's results and gradients in O(L + S) memory.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev), masks as in neural_attention (which validates
    the tensors and dispatches here). block_l / block_s: query / key rows per tile (default: default_block_size).
    """
    check_block_sizes(block_l, block_s)
    inputs, widths = split_inputs(q, k, v, score, attn_mask)
    L, S = inputs.A.shape[-2], inputs.Bk.shape[-2]
    default = default_block_size(math.prod(inputs.v.shape[:-2]), max(widths[:-1]), L, S)
    return ChunkedNeuralAttention.apply(*inputs, widths, score.activation, is_causal, block_l or default,
                                        block_s or default, False)


def compiled_neural_attention(q, k, v, score, attn_mask=None, *, is_causal=False, block_l=None, block_s=None):
    """neural_attention(..., backend="compiled"): chunked's results and memory with each tile step compiled.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). block_l / block_s: query / key rows per tile
    (default: compiled_block_size); each new value compiles again. Raises CompileError if torch.compile fails.
    """
    check_block_sizes(block_l, block_s)
    inputs, widths = split_inputs(q, k, v, score, attn_mask)
    L, S = inputs.A.shape[-2], inputs.Bk.shape[-2]
    default = compiled_block_size(math.prod(inputs.v.shape[:-2]), max(L, S))
    return ChunkedNeuralAttention.apply(*inputs, widths, score.activation, is_causal, block_l or default,
                                        block_s or default, L > 0 and S > 0)  # empty: no tile to compile
