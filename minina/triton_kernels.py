"""Fused Triton kernels for Neural Attention: forward and backward without ever building the (L, S) matrices.

Provenance: the structure of FlashAttention-2 (Dao 2023) as laid out in Triton's fused-attention tutorial, written
again in our own words for a score that is a small MLP instead of a dot product. Each program owns one block of
BLOCK_M queries, loops over blocks of BLOCK_N keys, recomputes the pair MLP on the (BLOCK_M, BLOCK_N) tile, and
keeps a running max m_i, running sum l_i and accumulator acc (online softmax). As in the tutorial the softmax runs
in base 2: log2(e) is folded into the MLP's last layer, so the kernels compute s2 = s log2(e) and use exp2. The
base-2 logsumexp of every row is saved; the backward recomputes each tile from it.

The first MLP layer is split over the concatenation (minina.tiles.split_inputs, the TileInputs that the chunked
backends take too): A = W1_q q_proj(q) + c (B, H, L, h1) and Bk = W1_k k_proj(k) (B, H, S, h1) are computed in
PyTorch, so the kernels only see the pair hidden layer act(A_i + Bk_j) and the remaining layers (h1 -> h2 -> 1).
Autograd carries dA and dBk back into q, k and the projections. A residual score (NeuralScore(residual=True))
also adds q_i . k_j / sqrt(E): the tile inputs hold (q / sqrt(E), k), and the kernels add it as FlashAttention
computes its logits, one tile product q k^T per tile (constexpr HAS_RESIDUAL, so scores without it compile as
before), with dS K and dS^T Q in the backward; autograd carries those through the 1 / sqrt(E).

Supported: CUDA tensors in fp32, fp16 and bf16 (bf16 needs compute capability >= 8.0: Triton cannot compile bf16
for older GPUs such as the T4, so there it is refused and "auto" falls back to chunked); A may be fp32 while Bk and
v are fp16/bf16, as autocast gives. All MLP and softmax arithmetic is in fp32; p @ V runs in v's dtype with fp32
accumulation, as FlashAttention does, and in exact fp32, not tf32, for fp32 inputs. Score MLPs with exactly two
hidden layers (the paper's 2P -> P -> P/2 -> 1 for P <= 16, or widths h1 <= 16, h2 <= 16) and the activations in
KERNEL_ACTIVATIONS, with or without the residual dot product (then head size E <= 256); value head size Ev <= 256;
any L and S (0 too), L != S, is_causal (top-left aligned), boolean or additive float masks broadcastable to
(..., L, S); any batch dims and strides. Offsets are int64 wherever a length meets a stride, and the grid is 1-D
(up to 2^31 - 1 programs, so any B*H).

Launch: on a GPU each kernel is autotuned over the few AUTOTUNE_CONFIGS whose hidden tile fits the registers
(_fitting_configs), keyed on L, S, E, Ev, the score MLP's shape, masking, the residual term and every tensor's
dtype; the interpreter, which cannot time anything, runs the largest fitting config; block_m/block_n/num_warps/
num_stages fix one. The pruning counts the hidden tile only: a residual score's q (or k) and dq (or dk) tiles,
(BLOCK_M, E) each, add registers, so its larger blocks spill more, most on older GPUs; autotuning times them.
Caution: tested only in Triton's CPU interpreter (TRITON_INTERPRET=1: every config, fp32 and fp16; its bf16 matmul
is wrong, so bf16 is checked on GPUs only, by `python -m minina bench --device cuda --check`), and compiled
without a GPU for sm_90, sm_80 (bf16) and sm_75 (fp16); the autotune set is to be pruned by measurements on
GPUs. Each new (L, S) is autotuned again (every fitting config timed, at every new shape); with lengths that vary,
pass a fixed configuration. The backward has no double backward: it raises whenever autograd asks it to build a graph
(create_graph=True), as a gradient penalty would; and a float attn_mask gets no gradient.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .tiles import first_order_backward, split_inputs

KERNEL_ACTIVATIONS = ("relu", "gelu")  # names of minina.activations.ACTIVATIONS that _activation implements
MAX_HIDDEN = (16, 16)  # widest (h1, h2): the paper's (P, P // 2) up to P = 16, and a little beyond
MAX_VALUE_DIM = 256  # widest value head Ev, and head E of a residual score's q . k tile
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2
LOG2E = math.log2(math.e)  # folded into the last layer on the host; the kernels write 1.44269... and ln 2 out

# The autotune set, smallest tiles first: (BLOCK_M, BLOCK_N) with num_warps and num_stages. 64- and 128-row blocks
# let Hopper use its fastest matrix instructions for p @ V; (16, 16) is for the widest score MLPs (h1 = 16).
AUTOTUNE_CONFIGS = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
           for block_m, block_n, warps, stages in [(16, 16, 4, 2), (32, 32, 4, 2), (64, 16, 8, 2), (64, 64, 8, 2),
                                                   (128, 16, 8, 2), (128, 32, 8, 2)]]
# fp32 registers per thread that one (BLOCK_M, BLOCK_N, H1P) hidden tile may take: larger tiles spill registers
# (ptxas -v shows how much), most in the backward kernels; autotuning times the spilling configs out.
TILE_REGISTERS = 32
# what the autotuner keys on; Triton adds every tensor's dtype
TUNING_KEY = ["L", "S", "E", "EV", "H1", "H2", "GELU", "MASK_KIND", "IS_CAUSAL", "HAS_RESIDUAL"]


def _fits(config, h1_padded):
    """Whether a (BLOCK_M, BLOCK_N, h1_padded) fp32 tile takes at most TILE_REGISTERS registers per thread."""
    tile = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] * h1_padded
    return tile <= TILE_REGISTERS * 32 * config.num_warps


def _fitting_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: only configs whose hidden tile fits the registers (the wider the MLP, the
    smaller the blocks); (16, 16) fits every h1 up to 16."""
    return [config for config in configs if _fits(config, kwargs["H1P"])]


@triton.jit
def _activation(x, GELU: tl.constexpr):
    if GELU:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))  # x Phi(x), nn.GELU's exact form
    return tl.maximum(x, 0.0)


@triton.jit
def _activation_grad(x, GELU: tl.constexpr):
    if GELU:  # d/dx x Phi(x) = Phi(x) + x phi(x)
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def _load_weights(W2, B2, W3, B3, H1P: tl.constexpr, H2P: tl.constexpr):
    """The MLP layers after the split one, zero-padded, loaded once per program: w2 (H2P, H1P), b2, w3 (H2P,), b3."""
    offs_c, offs_u = tl.arange(0, H2P), tl.arange(0, H1P)
    w2 = tl.load(W2 + offs_c[:, None] * H1P + offs_u[None, :])
    return w2, tl.load(B2 + offs_c), tl.load(W3 + offs_c), tl.load(B3)


@triton.jit
def _pair_logits(u, w2, b2, w3, b3, offs_c, H2: tl.constexpr, GELU: tl.constexpr, GRAD: tl.constexpr):
    """The pair MLP on the first-layer pre-activations u = A_i + Bk_j (BLOCK_M, BLOCK_N, H1P).

    Returns the logit tile s (BLOCK_M, BLOCK_N), in base-2 units since w3 and b3 carry log2(e), and h = act(u);
    with GRAD also what the backward needs, computed here once: the second layer's pre-activations z
    (BLOCK_M, BLOCK_N, H2P) and the Jacobian ds/du = act'(u) sum_c w3_c act'(z_c) W2[c, :] (BLOCK_M, BLOCK_N, H1P).
    """
    h = _activation(u, GELU)  # (BLOCK_M, BLOCK_N, H1P)
    s = tl.zeros([u.shape[0], u.shape[1]], dtype=tl.float32) + b3  # (BLOCK_M, BLOCK_N)
    z = tl.zeros([u.shape[0], u.shape[1], w3.shape[0]], dtype=tl.float32)  # (BLOCK_M, BLOCK_N, H2P)
    ds_du = tl.zeros(u.shape, dtype=tl.float32)  # first ds/dh, then ds/du
    for c in tl.static_range(H2):  # registers cannot be indexed: pick row c of the weights with a masked sum
        w2_c = tl.sum(tl.where(offs_c[:, None] == c, w2, 0.0), axis=0)  # (H1P,)
        w3_c = tl.sum(tl.where(offs_c == c, w3, 0.0), axis=0)
        z_c = tl.sum(h * w2_c[None, None, :], axis=2) + tl.sum(tl.where(offs_c == c, b2, 0.0), axis=0)  # (M, N)
        s += w3_c * _activation(z_c, GELU)  # s = sum_c w3_c act(z_c) + b3
        if GRAD:
            z = tl.where(offs_c[None, None, :] == c, z_c[:, :, None], z)
            ds_du += (w3_c * _activation_grad(z_c, GELU))[:, :, None] * w2_c[None, None, :]
    if GRAD:
        ds_du = ds_du * _activation_grad(u, GELU)
    return s, h, z, ds_du


@triton.jit
def _parameter_grads(ds, h, z, w3, offs_c, H2: tl.constexpr, GELU: tl.constexpr):
    """One tile's share of the gradients of W2 (H2P, H1P), b2 (H2P,) and w3 (H2P,), from the logit gradient ds
    (BLOCK_M, BLOCK_N) and the h, z that _pair_logits kept."""
    dz = ds[:, :, None] * w3[None, None, :] * _activation_grad(z, GELU)  # (BLOCK_M, BLOCK_N, H2P) dz_c = ds w3_c act'
    d_b2 = tl.sum(tl.sum(dz, axis=1), axis=0)  # db2_c = sum_ij dz_c
    d_w3 = tl.sum(tl.sum(ds[:, :, None] * _activation(z, GELU), axis=1), axis=0)  # dw3_c = sum_ij ds act(z_c)
    d_w2 = tl.zeros([w3.shape[0], h.shape[2]], dtype=tl.float32)  # (H2P, H1P)
    for c in tl.static_range(H2):
        dz_c = tl.sum(tl.where(offs_c[None, None, :] == c, dz, 0.0), axis=2)  # (BLOCK_M, BLOCK_N)
        d_w2_c = tl.sum(tl.sum(dz_c[:, :, None] * h, axis=1), axis=0)  # (H1P,) dW2[c, :] = sum_ij dz_c h
        d_w2 = tl.where(offs_c[:, None] == c, d_w2_c[None, :], d_w2)
    return d_w2, d_b2, d_w3


@triton.jit
def _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """s with -inf where key j may not be seen by query i (padding, causal, boolean mask); float masks added, in
    the base-2 units of s."""
    inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)  # (BLOCK_M, BLOCK_N)
    keep = inside
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=inside, other=0) != 0)
    if MASK_KIND == 2:
        s = s + tl.load(mask_ptrs, mask=inside, other=0.0).to(tl.float32) * 1.4426950408889634  # log2(e)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _load_tile(X, rows, n, cols, width, stride_row, stride_col):
    """Rows `rows` (those < n) and columns `cols` (those < width) of an (n, width) matrix, zero elsewhere:
    (len(rows), len(cols)), a tile of A, Bk, V, dO or the residual score's q and k."""
    return tl.load(X + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=(rows[:, None] < n) & (cols[None, :] < width), other=0.0)


@triton.jit
def _residual_logits(q, k):
    """The residual score's term q_i . k_j / sqrt(E) of a tile (q arrives divided by sqrt(E)), in the base-2 units
    of s: FlashAttention's q k^T tile, (BLOCK_M, BLOCK_E) x (BLOCK_N, BLOCK_E) -> (BLOCK_M, BLOCK_N)."""
    return tl.dot(q, tl.trans(k), input_precision="ieee") * 1.4426950408889634  # log2(e)


@triton.jit
def _forward_kernel(A, Bk, Q, K, V, Mask, W2, B2, W3, B3, Out, Lse,
                    stride_ab, stride_ah, stride_am, stride_au,
                    stride_bb, stride_bh, stride_bn, stride_bu,
                    stride_qb, stride_qh, stride_qm, stride_qe,
                    stride_kb, stride_kh, stride_kn, stride_ke,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_ob, stride_oh, stride_om, stride_od,
                    heads, L, S, H1, E, EV,
                    H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr, GELU: tl.constexpr,
                    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); out = softmax(s) V over all key blocks, and logsumexp.
    HAS_RESIDUAL (a residual score): s also gets q_i . k_j from Q = q / sqrt(E) (B, H, L, E) and K = k (B, H, S, E)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on: a length times a stride may pass 2^31
    blocks_m = tl.cdiv(L, BLOCK_M)
    start_m, off_bh = pid % blocks_m, pid // blocks_m  # query blocks vary fastest: a head's programs run together
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_bb + off_h * stride_bh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    Out += off_b * stride_ob + off_h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    offs_u, offs_d, offs_c, offs_e = tl.arange(0, H1P), tl.arange(0, BLOCK_D), tl.arange(0, H2P), tl.arange(0, BLOCK_E)
    w2, b2, w3, b3 = _load_weights(W2, B2, W3, B3, H1P, H2P)
    a = _load_tile(A, offs_m, L, offs_u, H1, stride_am, stride_au).to(tl.float32)  # (BLOCK_M, H1P)
    if HAS_RESIDUAL:  # the residual score's queries, loaded once like A
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        q = _load_tile(Q, offs_m, L, offs_e, E, stride_qm, stride_qe)  # (BLOCK_M, BLOCK_E)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the logits
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of 2^(s - m_i) V
    end_n = tl.minimum(S, (start_m + 1) * BLOCK_M) if IS_CAUSAL else S  # later keys are all in the future
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
        bk = _load_tile(Bk, offs_n, S, offs_u, H1, stride_bn, stride_bu).to(tl.float32)  # (BLOCK_N, H1P)
        s, _, _, _ = _pair_logits(a[:, None, :] + bk[None, :, :], w2, b2, w3, b3, offs_c, H2, GELU, False)
        if HAS_RESIDUAL:  # s_ij += q_i . k_j / sqrt(E)
            s += _residual_logits(q, _load_tile(K, offs_n, S, offs_e, E, stride_kn, stride_ke))
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i' = max(m_i, max_j s_ij)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far keeps p = 0, not NaN
        p = tl.exp2(s - m_safe[:, None])  # p_ij = 2^(s_ij - m_i')
        alpha = tl.exp2(m_i - m_safe)  # rescales what was summed under the old max: 2^(m_i - m_i')
        l_i = l_i * alpha + tl.sum(p, axis=1)  # l_i' = alpha l_i + sum_j p_ij
        v = _load_tile(V, offs_n, S, offs_d, EV, stride_vn, stride_vd)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # acc' = alpha acc + p V
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with nothing to attend outputs zeros
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < EV))
    # base-2 logsumexp m_i + log2 l_i; +inf on rows with nothing to attend makes the backward's 2^(s - lse) = 0
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(Lse + off_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _backward_keys_kernel(A, Bk, Q, K, V, Mask, W2, B2, W3, B3, DOut, Lse, Delta, DBk, DK, DV,
                          stride_ab, stride_ah, stride_am, stride_au,
                          stride_bb, stride_bh, stride_bn, stride_bu,
                          stride_qb, stride_qh, stride_qm, stride_qe,
                          stride_kb, stride_kh, stride_kn, stride_ke,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_mb, stride_mh, stride_mm, stride_mn,
                          stride_ob, stride_oh, stride_om, stride_od,
                          heads, L, S, H1, E, EV,
                          H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr, GELU: tl.constexpr,
                          MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head); loops over query blocks for dV_j and dBk_j (and, HAS_RESIDUAL,
    the residual term's dK_j in base 2: the host multiplies it by log2(e))."""
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on: a length times a stride may pass 2^31
    blocks_n = tl.cdiv(S, BLOCK_N)
    start_n, off_bh = pid % blocks_n, pid // blocks_n
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_bb + off_h * stride_bh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    DOut += off_b * stride_ob + off_h * stride_oh
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) int64
    offs_u, offs_d, offs_c, offs_e = tl.arange(0, H1P), tl.arange(0, BLOCK_D), tl.arange(0, H2P), tl.arange(0, BLOCK_E)
    w2, b2, w3, b3 = _load_weights(W2, B2, W3, B3, H1P, H2P)
    bk = _load_tile(Bk, offs_n, S, offs_u, H1, stride_bn, stride_bu).to(tl.float32)  # (BLOCK_N, H1P)
    v = _load_tile(V, offs_n, S, offs_d, EV, stride_vn, stride_vd)  # (BLOCK_N, BLOCK_D)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dbk = tl.zeros([BLOCK_N, H1P], dtype=tl.float32)
    if HAS_RESIDUAL:  # the residual score's keys, loaded once like Bk
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        k = _load_tile(K, offs_n, S, offs_e, E, stride_kn, stride_ke)  # (BLOCK_N, BLOCK_E)
        dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    first_m = start_n * BLOCK_N if IS_CAUSAL else 0  # causal: earlier queries never see these keys
    for start_m in range(first_m, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)  # (BLOCK_M,)
        a = _load_tile(A, offs_m, L, offs_u, H1, stride_am, stride_au).to(tl.float32)  # (BLOCK_M, H1P)
        do = _load_tile(DOut, offs_m, L, offs_d, EV, stride_om, stride_od).to(v.dtype)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(Lse + off_bh * L + offs_m, mask=offs_m < L, other=float("inf"))  # (BLOCK_M,) base 2
        delta = tl.load(Delta + off_bh * L + offs_m, mask=offs_m < L, other=0.0)  # (BLOCK_M,) rowsum(dO * O)
        s, _, _, ds_du = _pair_logits(a[:, None, :] + bk[None, :, :], w2, b2, w3, b3, offs_c, H2, GELU, True)
        if HAS_RESIDUAL:
            q = _load_tile(Q, offs_m, L, offs_e, E, stride_qm, stride_qe)  # (BLOCK_M, BLOCK_E)
            s += _residual_logits(q, k)  # s_ij += q_i . k_j / sqrt(E)
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])  # the forward's softmax weights, recomputed
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")  # dV_j = sum_i p_ij dO_i
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dp_ij = dO_i . V_j
        # softmax backward, ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'), times ln 2: the gradient of the base-2 s
        ds = p * (dp - delta[:, None]) * 0.6931471805599453
        dbk += tl.sum(ds[:, :, None] * ds_du, axis=0)  # dBk_j = sum_i ds_ij ds_ij/du_ij
        if HAS_RESIDUAL:  # dK_j = sum_i ds_ij q_i, as FlashAttention's dS^T Q
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision="ieee")
    key_rows = offs_n[:, None] < S
    tl.store(DV + off_bh * S * EV + offs_n[:, None] * EV + offs_d[None, :], dv, mask=key_rows & (offs_d[None, :] < EV))
    tl.store(DBk + off_bh * S * H1 + offs_n[:, None] * H1 + offs_u[None, :], dbk,
             mask=key_rows & (offs_u[None, :] < H1))
    if HAS_RESIDUAL:
        tl.store(DK + off_bh * S * E + offs_n[:, None] * E + offs_e[None, :], dk, mask=key_rows & (offs_e[None, :] < E))


@triton.jit
def _backward_queries_kernel(A, Bk, Q, K, V, Mask, W2, B2, W3, B3, DOut, Lse, Delta, DA, DQ, DW2, DB2, DW3, DB3,
                             stride_ab, stride_ah, stride_am, stride_au,
                             stride_bb, stride_bh, stride_bn, stride_bu,
                             stride_qb, stride_qh, stride_qm, stride_qe,
                             stride_kb, stride_kh, stride_kn, stride_ke,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             stride_ob, stride_oh, stride_om, stride_od,
                             heads, L, S, H1, E, EV,
                             H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr, GELU: tl.constexpr,
                             MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); loops over key blocks for dA_i (HAS_RESIDUAL: and dQ_i, in
    base 2 as dK) and this program's partial sums of the MLP parameter gradients (summed over programs in PyTorch,
    so no races)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on: a length times a stride may pass 2^31
    blocks_m = tl.cdiv(L, BLOCK_M)
    start_m, off_bh = pid % blocks_m, pid // blocks_m
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_bb + off_h * stride_bh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    DOut += off_b * stride_ob + off_h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64
    offs_u, offs_d, offs_c, offs_e = tl.arange(0, H1P), tl.arange(0, BLOCK_D), tl.arange(0, H2P), tl.arange(0, BLOCK_E)
    w2, b2, w3, b3 = _load_weights(W2, B2, W3, B3, H1P, H2P)
    a = _load_tile(A, offs_m, L, offs_u, H1, stride_am, stride_au).to(tl.float32)  # (BLOCK_M, H1P)
    do = _load_tile(DOut, offs_m, L, offs_d, EV, stride_om, stride_od).to(V.dtype.element_ty)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(Lse + off_bh * L + offs_m, mask=offs_m < L, other=float("inf"))  # (BLOCK_M,) base 2
    delta = tl.load(Delta + off_bh * L + offs_m, mask=offs_m < L, other=0.0)  # (BLOCK_M,)
    da = tl.zeros([BLOCK_M, H1P], dtype=tl.float32)
    d_w2 = tl.zeros([H2P, H1P], dtype=tl.float32)
    d_b2 = tl.zeros([H2P], dtype=tl.float32)
    d_w3 = tl.zeros([H2P], dtype=tl.float32)
    d_b3 = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_RESIDUAL:  # the residual score's queries, loaded once like A
        Q += off_b * stride_qb + off_h * stride_qh
        K += off_b * stride_kb + off_h * stride_kh
        q = _load_tile(Q, offs_m, L, offs_e, E, stride_qm, stride_qe)  # (BLOCK_M, BLOCK_E)
        dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    end_n = tl.minimum(S, (start_m + 1) * BLOCK_M) if IS_CAUSAL else S
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
        bk = _load_tile(Bk, offs_n, S, offs_u, H1, stride_bn, stride_bu).to(tl.float32)  # (BLOCK_N, H1P)
        v = _load_tile(V, offs_n, S, offs_d, EV, stride_vn, stride_vd)  # (BLOCK_N, BLOCK_D)
        s, h, z, ds_du = _pair_logits(a[:, None, :] + bk[None, :, :], w2, b2, w3, b3, offs_c, H2, GELU, True)
        if HAS_RESIDUAL:
            k = _load_tile(K, offs_n, S, offs_e, E, stride_kn, stride_ke)  # (BLOCK_N, BLOCK_E)
            s += _residual_logits(q, k)  # s_ij += q_i . k_j / sqrt(E)
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None]) * 0.6931471805599453  # gradient of the base-2 logits, as in the keys kernel
        da += tl.sum(ds[:, :, None] * ds_du, axis=1)  # dA_i = sum_j ds_ij ds_ij/du_ij
        if HAS_RESIDUAL:  # dQ_i = sum_j ds_ij k_j, as FlashAttention's dS K
            dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
        tile_w2, tile_b2, tile_w3 = _parameter_grads(ds, h, z, w3, offs_c, H2, GELU)
        d_w2 += tile_w2
        d_b2 += tile_b2
        d_w3 += tile_w3
        d_b3 += tl.sum(ds, axis=1)
    query_rows = offs_m[:, None] < L
    tl.store(DA + off_bh * L * H1 + offs_m[:, None] * H1 + offs_u[None, :], da,
             mask=query_rows & (offs_u[None, :] < H1))
    if HAS_RESIDUAL:
        tl.store(DQ + off_bh * L * E + offs_m[:, None] * E + offs_e[None, :], dq,
                 mask=query_rows & (offs_e[None, :] < E))
    tl.store(DW2 + pid * H2P * H1P + offs_c[:, None] * H1P + offs_u[None, :], d_w2)
    tl.store(DB2 + pid * H2P + offs_c, d_b2)
    tl.store(DW3 + pid * H2P + offs_c, d_w3)
    tl.store(DB3 + pid, tl.sum(d_b3, axis=0))


def _autotuned(kernel, reset_to_zero=None):
    return triton.autotune(AUTOTUNE_CONFIGS, key=TUNING_KEY, prune_configs_by={"early_config_prune": _fitting_configs},
                           reset_to_zero=reset_to_zero)(kernel)


_TUNED = {_forward_kernel: _autotuned(_forward_kernel), _backward_keys_kernel: _autotuned(_backward_keys_kernel),
          # the partial sums are indexed by program, whose count depends on BLOCK_M: zeroed before each trial
          _backward_queries_kernel: _autotuned(_backward_queries_kernel, ["DW2", "DB2", "DW3", "DB3"])}


def _launch(kernel, config, rows, block, batch_heads, *args, **meta):
    """kernel over a 1-D grid of (blocks of `rows`) x batch_heads programs, autotuned when config is None.
    CUDA allows 2^31 - 1 programs on axis 0 but only 65,535 on axes 1 and 2, too few for B*H."""
    grid = lambda launch: (triton.cdiv(rows, launch[block]) * batch_heads,)  # noqa: E731
    if config is None:
        _TUNED[kernel][grid](*args, **meta)
    else:
        kernel[grid](*args, **meta, **config.all_kwargs())


def _padded_parameters(w2, b2, w3, b3):
    """The layers after the split one in fp32, zero-padded to powers of two, the last one times log2(e) for exp2:
    W2 (H2P, H1P), b2, w3 (H2P,), b3 (1,)."""
    h2, h1 = w2.shape
    H2P, H1P = triton.next_power_of_2(h2), triton.next_power_of_2(h1)
    W2 = w2.new_zeros(H2P, H1P, dtype=torch.float32)
    W2[:h2, :h1] = w2
    B2, W3 = (w2.new_zeros(H2P, dtype=torch.float32) for _ in range(2))
    B2[:h2], W3[:h2] = b2, w3.reshape(h2) * LOG2E
    return W2, B2, W3, (b3.float() * LOG2E).contiguous()


def _pointers_and_strides(A, Bk, q_residual, k_residual, v, mask):
    """The kernels' first six tensors (A, Bk, Q, K, V, Mask) and their 24 strides, A and stride 0 standing in for
    the absent ones (no residual score, no mask), which the kernels never read."""
    tensors = (A, Bk, q_residual, k_residual, v, mask)
    strides = [stride for t in tensors for stride in (t.stride() if t is not None else (0, 0, 0, 0))]
    return [A if t is None else t for t in tensors], strides


def _as_batch_heads(t, heads):
    """t (..., n, width) viewed as (B, H, n, width): leading batch dims merged, no copy when 4-d."""
    return t.reshape(math.prod(t.shape[:-3]), heads, *t.shape[-2:])  # (B, H, n, width)


def _unpacked(weights, widths):
    """w2 (h2, h1), b2 (h2,), w3 (1, h2), b3 (1,): views of the flat weights of the layers after the split one."""
    h1, h2, _ = widths
    w2, b2, w3, b3 = weights.split([h2 * h1, h2, h2, 1])
    return w2.view(h2, h1), b2, w3, b3


class TritonNeuralAttention(torch.autograd.Function):
    """The kernels as an autograd Function of the TileInputs (minina.tiles), which it takes in their order, then the
    MLP widths (h1, h2, 1), the activation's name, is_causal and config: a triton.Config with BLOCK_M and BLOCK_N,
    or None to autotune. Batch dims are merged into (B, H) for the kernels and restored for the gradients.
    """

    @staticmethod
    def forward(ctx, A, Bk, v, q_residual, k_residual, attn_mask, weights, widths, activation, is_causal, config):
        heads = v.shape[-3] if v.dim() > 2 else 1
        batch, L, S, value_dim = v.shape[:-2], A.shape[-2], v.shape[-2], v.shape[-1]
        w2, b2, w3, b3 = _unpacked(weights, widths)
        q4, k4 = (None, None) if q_residual is None else (_as_batch_heads(q_residual, heads),
                                                          _as_batch_heads(k_residual, heads))  # (B, H, L|S, E)
        A4, Bk4, v4 = _as_batch_heads(A, heads), _as_batch_heads(Bk, heads), _as_batch_heads(v, heads)
        mask = None
        if attn_mask is not None:  # the kernels read a bool mask as uint8, nonzero = may attend
            mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
            mask = _as_batch_heads(mask.expand(*batch, L, S), heads)  # (B, H, L, S), stride 0 where broadcast
        B, head_dim = A4.shape[0], 0 if q4 is None else q4.shape[-1]
        out = torch.empty(B, heads, L, value_dim, dtype=v.dtype, device=v.device)  # (B, H, L, Ev)
        lse = torch.empty(B * heads, L, dtype=torch.float32, device=v.device)  # (B*H, L)
        mask_kind = NO_MASK if mask is None else BOOL_MASK if mask.dtype == torch.uint8 else FLOAT_MASK
        shared = dict(H1P=triton.next_power_of_2(widths[0]), H2=widths[1], H2P=triton.next_power_of_2(widths[1]),
                      GELU=activation == "gelu", MASK_KIND=mask_kind, IS_CAUSAL=is_causal, HAS_RESIDUAL=q4 is not None,
                      BLOCK_E=max(16, triton.next_power_of_2(head_dim)),
                      BLOCK_D=max(16, triton.next_power_of_2(value_dim)))
        pointers, strides = _pointers_and_strides(A4, Bk4, q4, k4, v4, mask)
        _launch(_forward_kernel, config, L, "BLOCK_M", B * heads,
                *pointers, *_padded_parameters(w2, b2, w3, b3), out, lse, *strides, *out.stride(),
                heads, L, S, widths[0], head_dim, value_dim, **shared)
        ctx.save_for_backward(A4, Bk4, q4, k4, v4, weights, mask, out, lse)
        ctx.shared, ctx.config, ctx.widths, ctx.shapes = shared, config, widths, (A.shape, Bk.shape, v.shape)
        ctx.backend = "triton"
        return out.reshape(*batch, L, value_dim)  # (..., L, Ev)

    @staticmethod
    @first_order_backward  # the kernels have no backward of their own
    def backward(ctx, d_out):
        A, Bk, q_residual, k_residual, v, weights, mask, out, lse = ctx.saved_tensors
        shared, config, (h1, h2, _) = ctx.shared, ctx.config, ctx.widths
        w2, b2, w3, b3 = _unpacked(weights, ctx.widths)
        batch, heads, L, _ = A.shape
        S, value_dim = v.shape[-2:]
        d_out = d_out.reshape(out.shape)  # (B, H, L, Ev)
        head_dim = 0 if q_residual is None else q_residual.shape[-1]
        H1P, H2P = shared["H1P"], shared["H2P"]
        delta = (d_out.float() * out.float()).sum(-1).reshape(batch * heads, L)  # (B*H, L) rowsum(dO * O)
        smallest_m = min(c.kwargs["BLOCK_M"] for c in AUTOTUNE_CONFIGS) if config is None else config.kwargs["BLOCK_M"]
        programs = batch * heads * triton.cdiv(L, smallest_m)  # the most query programs any config launches
        fp32 = dict(dtype=torch.float32, device=v.device)
        dA, dBk = torch.empty(batch, heads, L, h1, **fp32), torch.empty(batch, heads, S, h1, **fp32)
        dq, dk = torch.empty(batch, heads, L, head_dim, **fp32), torch.empty(batch, heads, S, head_dim, **fp32)
        dv = torch.empty(batch, heads, S, value_dim, **fp32)
        partial_w2, partial_b2 = torch.zeros(programs, H2P, H1P, **fp32), torch.zeros(programs, H2P, **fp32)
        partial_w3, partial_b3 = torch.zeros(programs, H2P, **fp32), torch.zeros(programs, **fp32)
        pointers, strides = _pointers_and_strides(A, Bk, q_residual, k_residual, v, mask)
        inputs = (*pointers, *_padded_parameters(w2, b2, w3, b3), d_out, lse, delta)
        sizes = (heads, L, S, h1, head_dim, value_dim)
        _launch(_backward_keys_kernel, config, S, "BLOCK_N", batch * heads, *inputs, dBk, dk, dv,
                *strides, *d_out.stride(), *sizes, **shared)
        _launch(_backward_queries_kernel, config, L, "BLOCK_M", batch * heads, *inputs, dA, dq,
                partial_w2, partial_b2, partial_w3, partial_b3, *strides, *d_out.stride(), *sizes, **shared)
        d_weights = torch.cat([partial_w2.sum(0)[:h2, :h1].reshape(-1),  # deterministic: a fixed-order sum
                               partial_b2.sum(0)[:h2],
                               partial_w3.sum(0)[:h2] * LOG2E,  # the kernels saw w3 log2(e)
                               (partial_b3.sum() * LOG2E).reshape(1)]).to(weights.dtype)
        # the kernels' residual term is q . k log2(e), and dq, dk are its gradients in the base-2 logits
        A_shape, Bk_shape, v_shape = ctx.shapes
        d_q, d_k = (None, None) if q_residual is None else (
            (dq * LOG2E).to(q_residual.dtype).reshape(*A_shape[:-1], head_dim),
            (dk * LOG2E).to(k_residual.dtype).reshape(*Bk_shape[:-1], head_dim))
        return (dA.to(A.dtype).reshape(A_shape), dBk.to(Bk.dtype).reshape(Bk_shape), dv.to(v.dtype).reshape(v_shape),
                d_q, d_k, None, d_weights, None, None, None, None)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _compute_capability(device):
    """(major, minor) of a CUDA device, None elsewhere (the interpreter)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _check_supported(q, v, score, attn_mask):
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' runs on CUDA tensors, got q on {q.device}; use backend='chunked' here, "
                         "or set TRITON_INTERPRET=1 before importing triton to run the kernels (slowly) on CPU")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 inputs, got q of dtype {q.dtype}")
    capability = _compute_capability(q.device)
    if q.dtype == torch.bfloat16 and capability is not None and capability < (8, 0):
        raise TypeError(f"backend='triton' needs compute capability >= 8.0 for bfloat16 (Triton cannot compile it "
                        f"for older GPUs), got q of dtype {q.dtype} on {q.device} with compute capability "
                        f"{capability[0]}.{capability[1]}; use float16 or backend='chunked'")
    if score.activation not in KERNEL_ACTIVATIONS:
        raise ValueError(f"backend='triton' implements the activations {KERNEL_ACTIVATIONS}, got "
                         f"score.activation={score.activation!r}; use backend='chunked'")
    hidden = score.hidden
    if len(hidden) != 2 or hidden[0] > MAX_HIDDEN[0] or hidden[1] > MAX_HIDDEN[1]:
        raise ValueError(f"backend='triton' supports score MLPs with two hidden layers (h1, h2), h1 <= "
                         f"{MAX_HIDDEN[0]} and h2 <= {MAX_HIDDEN[1]} (the paper's (P, P // 2) for P <= 16; else use "
                         f"backend='chunked'); got hidden={hidden}")
    if v.shape[-1] > MAX_VALUE_DIM:
        raise ValueError(f"backend='triton' supports value head sizes up to {MAX_VALUE_DIM}, got v {tuple(v.shape)}")
    if score.residual and q.shape[-1] > MAX_VALUE_DIM:
        raise ValueError(f"backend='triton' supports residual scores (NeuralScore(residual=True)) with head sizes up "
                         f"to {MAX_VALUE_DIM}, got q {tuple(q.shape)}")
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("backend='triton' does not compute gradients for a float attn_mask; pass one that does not "
                         "require grad, or use backend='chunked'")


def supports(q, v, score, attn_mask=None):
    """Whether the kernels take these inputs (device, dtype on that device, score MLP and activation, value size,
    head size for a residual score, and mask)."""
    try:
        _check_supported(q, v, score, attn_mask)
    except (TypeError, ValueError):
        return False
    return True


def _launch_config(h1, block_m, block_n, num_warps, num_stages, device):
    """The fixed triton.Config to run, or None to autotune (CUDA, nothing given). Without a GPU to time on, the
    default is the largest config that fits; values given replace its own."""
    if block_m is None and block_n is None and num_warps is None and num_stages is None and device.type == "cuda":
        return None
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block is not None and (not isinstance(block, int) or block < 16 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two of at least 16 (tl.dot's smallest tile), got {block!r}")
    default = _fitting_configs(AUTOTUNE_CONFIGS, {}, H1P=triton.next_power_of_2(h1))[-1]
    blocks = {"BLOCK_M": block_m or default.kwargs["BLOCK_M"], "BLOCK_N": block_n or default.kwargs["BLOCK_N"]}
    return triton.Config(blocks, num_warps=num_warps or default.num_warps, num_stages=num_stages or default.num_stages)


def triton_neural_attention(q, k, v, score, attn_mask=None, *, is_causal=False, block_m=None, block_n=None,
                            num_warps=None, num_stages=None):
    """Neural attention by the fused kernels: q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev).

    The same function as neural_attention(backend="reference") (DiGiugno & Mahmood 2025, Eq. 3-5), in O(L + S)
    memory; inputs are validated by neural_attention. On a GPU the launch configuration is autotuned over
    AUTOTUNE_CONFIGS; block_m, block_n (powers of two, at least 16), num_warps and num_stages fix it instead.
    """
    _check_supported(q, v, score, attn_mask)
    inputs, widths = split_inputs(q, k, v, score, attn_mask)
    config = _launch_config(widths[0], block_m, block_n, num_warps, num_stages, q.device)
    return TritonNeuralAttention.apply(*inputs, widths, score.activation, bool(is_causal), config)
