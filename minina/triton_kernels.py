"""Fused Triton kernels for Neural Attention: forward and backward without ever building the (L, S) matrices.

Provenance: the structure of FlashAttention-2 (Dao 2023) as laid out in Triton's fused-attention tutorial, written
again in our own words for a score that is a small MLP instead of a dot product. Each program owns one block of
BLOCK_M queries, loops over blocks of BLOCK_N keys, recomputes the pair MLP on the (BLOCK_M, BLOCK_N) tile, and
keeps a running max m_i, running sum l_i and accumulator acc (online softmax). The logsumexp of every row is saved;
the backward recomputes each tile from it.

The first MLP layer is split over the concatenation (NeuralScore.split): A = W1_q q_proj(q) + c (B, H, L, h1) and
Bk = W1_k k_proj(k) (B, H, S, h1) are computed in PyTorch, so the kernels only see the pair hidden layer
act(A_i + Bk_j) and the remaining layers (h1 -> h2 -> 1). Autograd carries dA and dBk back into q, k and the
projections.

Supported: CUDA tensors in fp32, fp16 and bf16 (all MLP and softmax arithmetic in fp32; p @ V in the input dtype
with fp32 accumulation, as FlashAttention does, and in exact fp32, not tf32, for fp32 inputs); score MLPs with
exactly two hidden layers (the paper's 2P -> P -> P/2 -> 1 for P <= 16, or widths h1 <= 16, h2 <= 16), ReLU or
GELU; value head size Ev <= 256; any L and S, L != S, is_causal (top-left aligned), boolean or additive float
masks broadcastable to (..., L, S); any batch dims and strides.
Caution: tested so far only in Triton's CPU interpreter (TRITON_INTERPRET=1, fp32 and fp16; the interpreter's
bf16 matmul is wrong, so bf16 is untested). No GPU has run these kernels yet: they compile for sm_75, sm_80 and
sm_90, and the block sizes are the largest that compile for sm_80 without register spills (the backward still
spills a little on sm_75 and sm_90), but nothing is timed or tuned. A T4 (sm_75) has no bf16 tensor cores: use
fp16 there. A float attn_mask gets no gradient.
"""
import math
import os

import torch
import triton
import triton.language as tl


MAX_HIDDEN = (16, 16)  # widest (h1, h2): the paper's (P, P // 2) up to P = 16, and a little beyond
MAX_VALUE_DIM = 256
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2


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
def _pair_logits(u, W2, B2, W3, B3, offs_u, H1P: tl.constexpr, H2: tl.constexpr, GELU: tl.constexpr):
    """Logit tile of the pair MLP from the first-layer pre-activation u = A_i + Bk_j (BLOCK_M, BLOCK_N, H1P)."""
    h = _activation(u, GELU)  # (BLOCK_M, BLOCK_N, H1P)
    s = tl.zeros([u.shape[0], u.shape[1]], dtype=tl.float32) + tl.load(B3).to(tl.float32)  # (BLOCK_M, BLOCK_N)
    for c in tl.static_range(H2):
        w2_row = tl.load(W2 + c * H1P + offs_u)  # (H1P,) zero-padded row c of the second layer
        z = tl.sum(h * w2_row[None, None, :], axis=2) + tl.load(B2 + c)  # (BLOCK_M, BLOCK_N)
        s += tl.load(W3 + c) * _activation(z, GELU)
    return s


@triton.jit
def _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """s with -inf where key j may not be seen by query i (padding, causal, boolean mask); float masks added."""
    inside = (offs_m[:, None] < L) & (offs_n[None, :] < S)  # (BLOCK_M, BLOCK_N)
    keep = inside
    if IS_CAUSAL:
        keep = keep & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND == 1:
        keep = keep & (tl.load(mask_ptrs, mask=inside, other=0) != 0)
    if MASK_KIND == 2:
        s = s + tl.load(mask_ptrs, mask=inside, other=0.0).to(tl.float32)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _forward_kernel(A, Bk, V, Mask, W2, B2, W3, B3, Out, Lse,
                    stride_ab, stride_ah, stride_am, stride_au,
                    stride_kb, stride_kh, stride_kn, stride_ku,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_ob, stride_oh, stride_om, stride_od,
                    heads, L, S, H1, EV,
                    H1P: tl.constexpr, H2: tl.constexpr, GELU: tl.constexpr,
                    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); out = softmax(s) V over all key blocks, and logsumexp."""
    start_m, off_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: no overflow on big tensors
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    Out += off_b * stride_ob + off_h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_u, offs_d = tl.arange(0, H1P), tl.arange(0, BLOCK_D)
    a = tl.load(A + offs_m[:, None] * stride_am + offs_u[None, :] * stride_au,
                mask=(offs_m[:, None] < L) & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_M, H1P)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the logits
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # running sum of exp(s - m_i) V
    end_n = tl.minimum(S, (start_m + 1) * BLOCK_M) if IS_CAUSAL else S  # later keys are all in the future
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        bk = tl.load(Bk + offs_n[:, None] * stride_kn
                     + offs_u[None, :] * stride_ku,
                     mask=(offs_n[:, None] < S) & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_N, H1P)
        s = _pair_logits(a[:, None, :] + bk[None, :, :], W2, B2, W3, B3, offs_u, H1P, H2, GELU)  # (BLOCK_M, BLOCK_N)
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # m_i' = max(m_i, max_j s_ij)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far keeps p = 0, not NaN
        p = tl.exp(s - m_safe[:, None])  # p_ij = exp(s_ij - m_i')
        alpha = tl.exp(m_i - m_safe)  # rescales what was summed under the old max: exp(m_i - m_i')
        l_i = l_i * alpha + tl.sum(p, axis=1)  # l_i' = alpha l_i + sum_j p_ij
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < EV), other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # acc' = alpha acc + p V
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with nothing to attend outputs zeros
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < L) & (offs_d[None, :] < EV))
    # logsumexp m_i + log l_i; +inf on rows with nothing to attend makes the backward's exp(s - lse) = 0
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.store(Lse + off_bh * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _pair_backward(u, ds, W2, B2, W3, offs_u, H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr,
                   GELU: tl.constexpr, PARAMETERS: tl.constexpr):
    """Back through the pair MLP: ds (BLOCK_M, BLOCK_N) -> du (BLOCK_M, BLOCK_N, H1P) and, if PARAMETERS, the
    tile's sums for dW2 (H2P, H1P), db2 (H2P,), dW3 (H2P,)."""
    h = _activation(u, GELU)  # (BLOCK_M, BLOCK_N, H1P)
    dh = tl.zeros(u.shape, dtype=tl.float32)
    offs_c = tl.arange(0, H2P)
    d_w2 = tl.zeros([H2P, H1P], dtype=tl.float32)
    d_b2 = tl.zeros([H2P], dtype=tl.float32)
    d_w3 = tl.zeros([H2P], dtype=tl.float32)
    for c in tl.static_range(H2):
        w2_row = tl.load(W2 + c * H1P + offs_u)  # (H1P,)
        z = tl.sum(h * w2_row[None, None, :], axis=2) + tl.load(B2 + c)  # (BLOCK_M, BLOCK_N)
        dz = ds * tl.load(W3 + c) * _activation_grad(z, GELU)  # ds/dz_c = W3_c act'(z_c)
        dh += dz[:, :, None] * w2_row[None, None, :]
        if PARAMETERS:
            d_w3 += tl.where(offs_c == c, tl.sum(tl.sum(ds * _activation(z, GELU), axis=1), axis=0), 0.0)
            d_b2 += tl.where(offs_c == c, tl.sum(tl.sum(dz, axis=1), axis=0), 0.0)
            d_w2_row = tl.sum(tl.sum(dz[:, :, None] * h, axis=1), axis=0)  # (H1P,)
            d_w2 += tl.where(offs_c[:, None] == c, d_w2_row[None, :], 0.0)
    return dh * _activation_grad(u, GELU), d_w2, d_b2, d_w3


@triton.jit
def _backward_keys_kernel(A, Bk, V, Mask, W2, B2, W3, B3, DOut, Lse, Delta, DBk, DV,
                          stride_ab, stride_ah, stride_am, stride_au,
                          stride_kb, stride_kh, stride_kn, stride_ku,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_mb, stride_mh, stride_mm, stride_mn,
                          stride_ob, stride_oh, stride_om, stride_od,
                          heads, L, S, H1, EV,
                          H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr, GELU: tl.constexpr,
                          MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, head); loops over query blocks for dV_j and dBk_j."""
    start_n, off_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: no overflow on big tensors
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    DOut += off_b * stride_ob + off_h * stride_oh
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_u, offs_d = tl.arange(0, H1P), tl.arange(0, BLOCK_D)
    key_rows = offs_n[:, None] < S
    bk = tl.load(Bk + offs_n[:, None] * stride_kn + offs_u[None, :] * stride_ku,
                 mask=key_rows & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_N, H1P)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_rows & (offs_d[None, :] < EV), other=0.0)  # (BLOCK_N, BLOCK_D)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dbk = tl.zeros([BLOCK_N, H1P], dtype=tl.float32)
    first_m = start_n * BLOCK_N if IS_CAUSAL else 0  # causal: earlier queries never see these keys
    for start_m in range(first_m, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        query_rows = offs_m[:, None] < L
        a = tl.load(A + offs_m[:, None] * stride_am
                    + offs_u[None, :] * stride_au,
                    mask=query_rows & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_M, H1P)
        do = tl.load(DOut + offs_m[:, None] * stride_om
                     + offs_d[None, :] * stride_od,
                     mask=query_rows & (offs_d[None, :] < EV), other=0.0)  # (BLOCK_M, BLOCK_D)
        lse = tl.load(Lse + off_bh * L + offs_m, mask=offs_m < L, other=float("inf"))  # (BLOCK_M,)
        delta = tl.load(Delta + off_bh * L + offs_m, mask=offs_m < L, other=0.0)  # (BLOCK_M,) rowsum(dO * O)
        u = a[:, None, :] + bk[None, :, :]  # (BLOCK_M, BLOCK_N, H1P)
        s = _pair_logits(u, W2, B2, W3, B3, offs_u, H1P, H2, GELU)  # (BLOCK_M, BLOCK_N)
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)
        p = tl.exp(s - lse[:, None])  # the forward's softmax weights, recomputed
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision="ieee")  # dV_j = sum_i p_ij dO_i
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # dp_ij = dO_i . V_j
        ds = p * (dp - delta[:, None])  # softmax backward: ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij')
        du, _, _, _ = _pair_backward(u, ds, W2, B2, W3, offs_u, H1P, H2, H2P, GELU, False)
        dbk += tl.sum(du, axis=0)  # dBk_j = sum_i du_ij
    tl.store(DV + off_bh * S * EV + offs_n[:, None] * EV + offs_d[None, :], dv, mask=key_rows & (offs_d[None, :] < EV))
    tl.store(DBk + off_bh * S * H1 + offs_n[:, None] * H1 + offs_u[None, :], dbk,
             mask=key_rows & (offs_u[None, :] < H1))


@triton.jit
def _backward_queries_kernel(A, Bk, V, Mask, W2, B2, W3, B3, DOut, Lse, Delta, DA, DW2, DB2, DW3, DB3,
                             stride_ab, stride_ah, stride_am, stride_au,
                             stride_kb, stride_kh, stride_kn, stride_ku,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             stride_ob, stride_oh, stride_om, stride_od,
                             heads, L, S, H1, EV,
                             H1P: tl.constexpr, H2: tl.constexpr, H2P: tl.constexpr, GELU: tl.constexpr,
                             MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head); loops over key blocks for dA_i = sum_j du_ij and this
    program's partial sums of the MLP parameter gradients (summed over programs in PyTorch, so no races)."""
    start_m, off_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: no overflow on big tensors
    off_b, off_h = off_bh // heads, off_bh % heads
    A += off_b * stride_ab + off_h * stride_ah  # move every pointer to this (batch, head)
    Bk += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh
    DOut += off_b * stride_ob + off_h * stride_oh
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_u, offs_d, offs_c = tl.arange(0, H1P), tl.arange(0, BLOCK_D), tl.arange(0, H2P)
    query_rows = offs_m[:, None] < L
    a = tl.load(A + offs_m[:, None] * stride_am + offs_u[None, :] * stride_au,
                mask=query_rows & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_M, H1P)
    do = tl.load(DOut + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                 mask=query_rows & (offs_d[None, :] < EV), other=0.0)  # (BLOCK_M, BLOCK_D)
    lse = tl.load(Lse + off_bh * L + offs_m, mask=offs_m < L, other=float("inf"))  # (BLOCK_M,)
    delta = tl.load(Delta + off_bh * L + offs_m, mask=offs_m < L, other=0.0)  # (BLOCK_M,)
    da = tl.zeros([BLOCK_M, H1P], dtype=tl.float32)
    d_w2 = tl.zeros([H2P, H1P], dtype=tl.float32)
    d_b2 = tl.zeros([H2P], dtype=tl.float32)
    d_w3 = tl.zeros([H2P], dtype=tl.float32)
    d_b3 = tl.zeros([BLOCK_M], dtype=tl.float32)
    end_n = tl.minimum(S, (start_m + 1) * BLOCK_M) if IS_CAUSAL else S
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_rows = offs_n[:, None] < S
        bk = tl.load(Bk + offs_n[:, None] * stride_kn
                     + offs_u[None, :] * stride_ku,
                     mask=key_rows & (offs_u[None, :] < H1), other=0.0).to(tl.float32)  # (BLOCK_N, H1P)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_rows & (offs_d[None, :] < EV), other=0.0)  # (BLOCK_N, BLOCK_D)
        u = a[:, None, :] + bk[None, :, :]  # (BLOCK_M, BLOCK_N, H1P)
        s = _pair_logits(u, W2, B2, W3, B3, offs_u, H1P, H2, GELU)  # (BLOCK_M, BLOCK_N)
        mask_ptrs = Mask + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
        s = _masked(s, offs_m, offs_n, L, S, mask_ptrs, MASK_KIND, IS_CAUSAL)
        p = tl.exp(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        du, tile_w2, tile_b2, tile_w3 = _pair_backward(u, ds, W2, B2, W3, offs_u, H1P, H2, H2P, GELU, True)
        da += tl.sum(du, axis=1)  # dA_i = sum_j du_ij
        d_w2 += tile_w2
        d_b2 += tile_b2
        d_w3 += tile_w3
        d_b3 += tl.sum(ds, axis=1)
    tl.store(DA + off_bh * L * H1 + offs_m[:, None] * H1 + offs_u[None, :], da,
             mask=query_rows & (offs_u[None, :] < H1))
    program = off_bh * tl.num_programs(0) + start_m
    tl.store(DW2 + program * H2P * H1P + offs_c[:, None] * H1P + offs_u[None, :], d_w2)
    tl.store(DB2 + program * H2P + offs_c, d_b2)
    tl.store(DW3 + program * H2P + offs_c, d_w3)
    tl.store(DB3 + program, tl.sum(d_b3, axis=0))


def _launch_config(h1):
    """(block, num_warps) with BLOCK_M = BLOCK_N = block: the (BLOCK_M, BLOCK_N, h1) hidden tiles fill the
    registers, so blocks shrink as h1 grows; tl.dot needs blocks of at least 16. Chosen as the largest blocks
    whose three kernels compile for sm_80 in bf16 without register spills (ptxas -v); not yet timed on a GPU."""
    h1_padded = triton.next_power_of_2(h1)
    if h1_padded <= 2:
        return 32, 4
    return (32, 8) if h1_padded <= 8 else (16, 4)


def _padded_parameters(w2, b2, w3, b3):
    """The layers after the split one, in fp32, zero-padded to powers of two: W2 (H2P, H1P), b2, w3 (H2P,), b3 (1,)."""
    h2, h1 = w2.shape
    H2P, H1P = triton.next_power_of_2(h2), triton.next_power_of_2(h1)
    W2 = w2.new_zeros(H2P, H1P, dtype=torch.float32)
    W2[:h2, :h1] = w2
    B2, W3 = (w2.new_zeros(H2P, dtype=torch.float32) for _ in range(2))
    B2[:h2], W3[:h2] = b2, w3.reshape(h2)
    return W2, B2, W3, b3.float().contiguous()


class TritonNeuralAttention(torch.autograd.Function):
    """The kernels as an autograd Function of (A, Bk, V) and the MLP layers after the split one.

    A (B, H, L, h1), Bk (B, H, S, h1), v (B, H, S, Ev), any strides; w2 (h2, h1), b2 (h2,), w3 (1, h2), b3 (1,);
    mask None, uint8 (nonzero = may attend) or float (added), broadcast to (B, H, L, S) -> out (B, H, L, Ev).
    block_m, block_n, num_warps: the launch configuration.
    """

    @staticmethod
    def forward(ctx, A, Bk, v, w2, b2, w3, b3, mask, is_causal, gelu, block_m, block_n, num_warps):
        batch, heads, L, h1 = A.shape
        S, value_dim = v.shape[-2:]
        block_d = max(16, triton.next_power_of_2(value_dim))
        parameters = _padded_parameters(w2, b2, w3, b3)
        out = torch.empty(batch, heads, L, value_dim, dtype=v.dtype, device=v.device)  # (B, H, L, Ev)
        lse = torch.empty(batch * heads, L, dtype=torch.float32, device=v.device)  # (B*H, L)
        mask_kind = NO_MASK if mask is None else BOOL_MASK if mask.dtype == torch.uint8 else FLOAT_MASK
        shared = dict(H1P=triton.next_power_of_2(h1), H2=w2.shape[0], GELU=gelu, MASK_KIND=mask_kind,
                      IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
        _forward_kernel[(triton.cdiv(L, block_m), batch * heads)](
            A, Bk, v, A if mask is None else mask, *parameters, out, lse,
            *A.stride(), *Bk.stride(), *v.stride(), *(mask.stride() if mask is not None else (0, 0, 0, 0)),
            *out.stride(), heads, L, S, h1, value_dim, **shared)
        ctx.save_for_backward(A, Bk, v, w2, b2, w3, b3, mask, out, lse)
        ctx.shared = shared
        return out

    @staticmethod
    def backward(ctx, d_out):
        A, Bk, v, w2, b2, w3, b3, mask, out, lse = ctx.saved_tensors
        shared = ctx.shared
        batch, heads, L, h1 = A.shape
        S, value_dim = v.shape[-2:]
        h2, H1P = w2.shape[0], shared["H1P"]
        H2P = triton.next_power_of_2(h2)
        parameters = _padded_parameters(w2, b2, w3, b3)
        delta = (d_out.float() * out.float()).sum(-1).reshape(batch * heads, L)  # (B*H, L) rowsum(dO * O)
        query_blocks = triton.cdiv(L, shared["BLOCK_M"])
        programs = batch * heads * query_blocks
        fp32 = dict(dtype=torch.float32, device=v.device)
        dA, dBk = torch.empty(batch, heads, L, h1, **fp32), torch.empty(batch, heads, S, h1, **fp32)
        dv = torch.empty(batch, heads, S, value_dim, **fp32)
        partial_w2, partial_b2 = torch.empty(programs, H2P, H1P, **fp32), torch.empty(programs, H2P, **fp32)
        partial_w3, partial_b3 = torch.empty(programs, H2P, **fp32), torch.empty(programs, **fp32)
        strides = (*A.stride(), *Bk.stride(), *v.stride(),
                   *(mask.stride() if mask is not None else (0, 0, 0, 0)), *d_out.stride())
        sizes = (heads, L, S, h1, value_dim)
        mask_arg = A if mask is None else mask
        _backward_keys_kernel[(triton.cdiv(S, shared["BLOCK_N"]), batch * heads)](
            A, Bk, v, mask_arg, *parameters, d_out, lse, delta, dBk, dv, *strides, *sizes, H2P=H2P, **shared)
        _backward_queries_kernel[(query_blocks, batch * heads)](
            A, Bk, v, mask_arg, *parameters, d_out, lse, delta, dA, partial_w2, partial_b2, partial_w3, partial_b3,
            *strides, *sizes, H2P=H2P, **shared)
        d_w2 = partial_w2.sum(0)[:h2, :h1].to(w2.dtype)  # deterministic: a fixed-order sum over programs
        d_b2 = partial_b2.sum(0)[:h2].to(b2.dtype)
        d_w3 = partial_w3.sum(0)[:h2].reshape(1, h2).to(w3.dtype)
        d_b3 = partial_b3.sum().reshape(1).to(b3.dtype)
        return (dA.to(A.dtype), dBk.to(Bk.dtype), dv.to(v.dtype), d_w2, d_b2, d_w3, d_b3,
                None, None, None, None, None, None)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _check_supported(q, v, score, attn_mask):
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' runs on CUDA tensors, got q on {q.device}; use backend='chunked' here, "
                         "or set TRITON_INTERPRET=1 before importing triton to run the kernels (slowly) on CPU")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 inputs, got q of dtype {q.dtype}")
    hidden = score.hidden
    if len(hidden) != 2 or hidden[0] > MAX_HIDDEN[0] or hidden[1] > MAX_HIDDEN[1]:
        raise ValueError(f"backend='triton' supports score MLPs with two hidden layers (h1, h2), h1 <= "
                         f"{MAX_HIDDEN[0]} and h2 <= {MAX_HIDDEN[1]} (the paper's (P, P // 2) for P <= 16; else use "
                         f"backend='chunked'); "
                         f"got hidden={hidden}")
    if v.shape[-1] > MAX_VALUE_DIM:
        raise ValueError(f"backend='triton' supports value head sizes up to {MAX_VALUE_DIM}, got v {tuple(v.shape)}")
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("backend='triton' does not compute gradients for a float attn_mask; pass one that does not "
                         "require grad, or use backend='chunked'")


def supports(q, v, score, attn_mask=None):
    """Whether the kernels take these inputs (their device, dtype, score MLP shape, value size and mask)."""
    try:
        _check_supported(q, v, score, attn_mask)
    except (TypeError, ValueError):
        return False
    return True


def _as_batch_heads(t, batch, tail):
    """t broadcast to (*batch, *tail) and viewed as (B, H, *tail): leading batch dims merged, no copy when 4-d."""
    heads = batch[-1] if batch else 1
    return t.expand(*batch, *tail).reshape(math.prod(batch[:-1]), heads, *tail)  # (B, H, *tail)


def triton_neural_attention(q, k, v, score, attn_mask=None, is_causal=False, *, block_m=None, block_n=None):
    """Neural attention by the fused kernels: q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev).

    The same function as neural_attention(backend="reference") (DiGiugno & Mahmood 2025, Eq. 3-5), in O(L + S)
    memory; inputs are validated by neural_attention. block_m, block_n (powers of two, at least 16) override
    the launch configuration.
    """
    _check_supported(q, v, score, attn_mask)
    A, Bk, ((w2, b2), (w3, b3)) = score.split(q, k)  # (..., L, h1), (..., S, h1)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    L, S, h1 = q.shape[-2], k.shape[-2], A.shape[-1]
    A = _as_batch_heads(A, batch, (L, h1))  # (B, H, L, h1)
    Bk = _as_batch_heads(Bk, batch, (S, h1))  # (B, H, S, h1)
    values = _as_batch_heads(v, batch, v.shape[-2:])  # (B, H, S, Ev)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(torch.uint8) if attn_mask.dtype == torch.bool else attn_mask
        mask = _as_batch_heads(mask, batch, (L, S))  # (B, H, L, S), stride 0 where broadcast
    block, num_warps = _launch_config(h1)
    out = TritonNeuralAttention.apply(A, Bk, values, w2, b2, w3, b3, mask, bool(is_causal), score.activation == "gelu",
                                      block_m or block, block_n or block, num_warps)
    return out.reshape(*batch, L, v.shape[-1])  # (..., L, Ev)
