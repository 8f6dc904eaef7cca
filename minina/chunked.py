"""Memory-efficient neural attention: online softmax over key blocks, score tiles recomputed in backward.

The algorithm is FlashAttention's (Dao et al. 2022; Dao 2023, Alg. 1 and 2) with the dot product replaced by the
paper's pair MLP (DiGiugno & Mahmood 2025, Eq. 3-5). Its first layer splits over the concatenation,
W1 [a_i; b_j] + c = (W1_q a_i + c) + W1_k b_j, so NeuralScore.split gives A (..., L, h1) and Bk (..., S, h1) once,
and the score of pair (i, j) is the rest of the MLP applied to act(A_i + Bk_j). The (..., L, S, 2P) pair tensor of
the reference never exists: memory is O(batch * (L + S) * (E + h1)) plus one (query block x key block) tile.

The autograd Function below owns A, Bk, v and the remaining MLP layers; gradients of q, k, q_proj, k_proj and the
first layer flow through split() by ordinary autograd. This file is the readable blueprint of the fused Triton
kernel: the same loops, the same saved logsumexp, the same recomputation. Every NeuralScore option runs here
(the residual score adds its dot product per tile: no (L, S) tensor); float16/bfloat16 inputs run with float32
tiles and accumulators.
Caution: pure PyTorch launches a few dozen small ops per tile, so it trades speed for memory (README, Performance);
the fast paths are the compiled tiles on CPU (minina.compiled) and the fused Triton kernel on GPU.
"""
import functools
import math

import torch

from .activations import ACTIVATIONS

TILE_ELEMENTS = 2 ** 19  # default budget for one (hidden, batch, query block, key block) tile



def first_order_backward(backend):
    """Decorator for the backward of a Function written without a graph of its own: raise when autograd asks it to
    build one (create_graph=True). once_differentiable raises only when the incoming gradient requires grad, so a
    loss linear in the output would get a second derivative that silently lacks the backward's own terms."""
    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():  # autograd runs a backward in grad mode exactly when create_graph=True
                raise RuntimeError(f"backend={backend!r} has no double backward: its backward cannot build a graph "
                                   "(create_graph=True); use backend='reference' to differentiate twice")
            return backward(ctx, *grads)
        return checked
    return decorate

def default_block_size(batch_size, hidden_width, L, S):
    """Square blocks, a power of two in [16, 256], so that a tile holds at most about TILE_ELEMENTS numbers."""
    block = 16
    while block < 256 and batch_size * (2 * block) ** 2 * hidden_width <= TILE_ELEMENTS:
        block *= 2
    return min(block, max(L, S, 1))


def _mask_tile(mask, rows, cols):
    """The (..., rows, cols) block of a mask broadcastable to (..., L, S); a size-1 dim stays size 1."""
    return mask[..., rows if mask.shape[-2] > 1 else slice(None), cols if mask.shape[-1] > 1 else slice(None)]


def _linear(weight, bias, x):
    """A Linear layer on a hidden-first tile: (out, in), (out,), (in, ...) -> (out, ...).

    Hidden widths are tiny (the paper's are 2 and 1), and a (out, in) @ (in, many) product is much faster than
    (many, in) @ (in, out), so tiles keep the hidden dimension first.
    """
    return (weight @ x.flatten(1)).view(-1, *x.shape[1:]) + bias.view(-1, *[1] * (x.dim() - 1))


def _tile_logits(A_block, Bk_block, rest, activation, attn_mask, is_causal, rows, cols, dot_blocks=None):
    """Scores of one tile from hidden-first A and Bk blocks: (h1, ..., bl), (h1, ..., bs) -> (..., bl, bs).

    dot_blocks: None, or the (..., bl, E), (..., bs, E) blocks of a residual score's scaled q and k, whose dot
    products are added. Masked pairs get -inf. Also returns the pre-activations backward needs, one
    (width, ..., bl, bs) per layer.
    """
    act = ACTIVATIONS[activation].function
    pre = A_block.unsqueeze(-1) + Bk_block.unsqueeze(-2)  # (h1, ..., bl, bs) = A_i + Bk_j
    pre_activations = [pre]
    for weight, bias in rest[:-1]:
        pre = _linear(weight, bias, act(pre))  # (width, ..., bl, bs)
        pre_activations.append(pre)
    logits = _linear(*rest[-1], act(pre)).squeeze(0)  # (..., bl, bs)
    if dot_blocks is not None:
        logits = logits + dot_blocks[0] @ dot_blocks[1].transpose(-2, -1)  # + q_i . k_j / sqrt(E)
    if attn_mask is not None:
        tile = _mask_tile(attn_mask, rows, cols)
        logits = logits.masked_fill(~tile, -math.inf) if tile.dtype == torch.bool else logits + tile.to(logits.dtype)
    if is_causal and cols.stop - 1 > rows.start:  # the tile reaches above the diagonal
        future = torch.arange(cols.start, cols.stop, device=logits.device) > torch.arange(
            rows.start, rows.stop, device=logits.device).unsqueeze(-1)  # (bl, bs) key after query
        logits = logits.masked_fill(future, -math.inf)
    return logits, pre_activations


def _dot_blocks(dot, rows, cols):
    """The query rows and key cols of a residual score's (scaled q, k), or None."""
    return None if dot is None else (dot[0][..., rows, :], dot[1][..., cols, :])


def _key_blocks(rows, S, block_s, is_causal):
    """Key-block slices that query rows may see: all, or (causal) those starting before rows.stop."""
    stop = min(S, rows.stop) if is_causal else S
    return [slice(j, min(j + block_s, S)) for j in range(0, stop, block_s)]


class ChunkedNeuralAttention(torch.autograd.Function):
    """out = softmax(MLP_rest(act(A_i + Bk_j)) [+ q_i . k_j] + mask) v, walked tile by tile; saves the logsumexp.

    A (..., L, h1), Bk (..., S, h1), v (..., S, Ev) with the same batch dims; q_dot (..., L, E), k_dot (..., S, E)
    the residual score's scaled q and k, or both None; rest_params = W2, b2, ..., Wn, bn; attn_mask None or with
    as many dims as v, broadcastable to (..., L, S).
    """

    @staticmethod
    def forward(ctx, A, Bk, v, q_dot, k_dot, attn_mask, is_causal, activation, block_l, block_s, *rest_params):
        compute = torch.promote_types(v.dtype, torch.float32)  # fp32 accumulation for half and bfloat16
        rest = [(w.to(compute), b.to(compute)) for w, b in zip(rest_params[::2], rest_params[1::2])]
        A_t = A.movedim(-1, 0).to(compute).contiguous()  # (h1, ..., L)
        Bk_t = Bk.movedim(-1, 0).to(compute).contiguous()  # (h1, ..., S)
        L, S = A.shape[-2], Bk.shape[-2]
        dot = None if q_dot is None else (q_dot.to(compute), k_dot.to(compute))  # (..., L, E), (..., S, E)
        out = torch.zeros(*v.shape[:-2], L, v.shape[-1], dtype=compute, device=v.device)  # (..., L, Ev)
        logsumexp = torch.full((*v.shape[:-2], L), -math.inf, dtype=compute, device=v.device)  # (..., L)
        for i in range(0, L, block_l):
            rows = slice(i, min(i + block_l, L))
            row_max = torch.full((*v.shape[:-2], rows.stop - i), -math.inf, dtype=compute, device=v.device)  # m_i
            row_sum = torch.zeros_like(row_max)  # l_i  (..., bl)
            acc = torch.zeros(*row_max.shape, v.shape[-1], dtype=compute, device=v.device)  # (..., bl, Ev)
            for cols in _key_blocks(rows, S, block_s, is_causal):
                logits, _ = _tile_logits(A_t[..., rows], Bk_t[..., cols], rest, activation, attn_mask, is_causal,
                                         rows, cols, _dot_blocks(dot, rows, cols))  # (..., bl, bs)
                new_max = torch.maximum(row_max, logits.amax(dim=-1))  # m_new = max(m_i, rowmax(S_ij))
                safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))  # all -inf
                rescale = torch.exp(row_max - safe_max)  # exp(m_i - m_new)
                p = torch.exp(logits - safe_max.unsqueeze(-1))  # P_ij = exp(S_ij - m_new)  (..., bl, bs)
                row_sum = row_sum * rescale + p.sum(dim=-1)  # l_i = l_i exp(m_i - m_new) + rowsum(P_ij)
                acc = acc * rescale.unsqueeze(-1) + p @ v[..., cols, :].to(compute)  # (..., bl, Ev)
                row_max = new_max
            has_keys = row_sum > 0  # a row with every key masked outputs zeros
            out[..., rows, :] = acc / torch.where(has_keys, row_sum, torch.ones_like(row_sum)).unsqueeze(-1)
            logsumexp[..., rows] = torch.where(has_keys, row_max + torch.log(row_sum), logsumexp[..., rows])
        ctx.save_for_backward(A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params)
        ctx.is_causal, ctx.activation, ctx.block_l, ctx.block_s = is_causal, activation, block_l, block_s
        return out.to(v.dtype)

    @staticmethod
    @first_order_backward("chunked")
    def backward(ctx, grad_out):
        A, Bk, v, q_dot, k_dot, out, logsumexp, attn_mask, *rest_params = ctx.saved_tensors
        compute, (_, act, act_grad) = out.dtype, ACTIVATIONS[ctx.activation]
        rest = [(w.to(compute), b.to(compute)) for w, b in zip(rest_params[::2], rest_params[1::2])]
        A_t = A.movedim(-1, 0).to(compute).contiguous()  # (h1, ..., L)
        Bk_t = Bk.movedim(-1, 0).to(compute).contiguous()  # (h1, ..., S)
        L, S = A.shape[-2], Bk.shape[-2]
        dot = None if q_dot is None else (q_dot.to(compute), k_dot.to(compute))  # (..., L, E), (..., S, E)
        grad_dot = None if dot is None else (torch.zeros_like(dot[0]), torch.zeros_like(dot[1]))
        grad_out = grad_out.to(compute)
        delta = (grad_out * out).sum(dim=-1)  # D_i = dO_i . O_i  (..., L)
        safe_lse = torch.where(torch.isfinite(logsumexp), logsumexp, torch.full_like(logsumexp, math.inf))
        grad_A_t, grad_Bk_t = torch.zeros_like(A_t), torch.zeros_like(Bk_t)  # (h1, ..., L), (h1, ..., S)
        grad_v = torch.zeros(v.shape, dtype=compute, device=v.device)  # (..., S, Ev)
        grad_rest = [[torch.zeros_like(w), torch.zeros_like(b)] for w, b in rest]
        mask_needs_grad = attn_mask is not None and ctx.needs_input_grad[5]
        grad_mask = torch.zeros(attn_mask.shape, dtype=compute, device=v.device) if mask_needs_grad else None
        for i in range(0, L, ctx.block_l):
            rows = slice(i, min(i + ctx.block_l, L))
            grad_out_block = grad_out[..., rows, :]  # (..., bl, Ev)
            for cols in _key_blocks(rows, S, ctx.block_s, ctx.is_causal):
                logits, pre_activations = _tile_logits(A_t[..., rows], Bk_t[..., cols], rest, ctx.activation,
                                                       attn_mask, ctx.is_causal, rows, cols,
                                                       _dot_blocks(dot, rows, cols))  # (..., bl, bs)
                p = torch.exp(logits - safe_lse[..., rows].unsqueeze(-1))  # P_ij = exp(S_ij - LSE_i)
                v_block = v[..., cols, :].to(compute)  # (..., bs, Ev)
                grad_v[..., cols, :] += p.transpose(-2, -1) @ grad_out_block  # dV_j += P_ij^T dO_i
                grad_p = grad_out_block @ v_block.transpose(-2, -1)  # dP_ij = dO_i V_j^T  (..., bl, bs)
                grad_logits = p * (grad_p - delta[..., rows].unsqueeze(-1))  # dS_ij = P_ij (dP_ij - D_i)
                if mask_needs_grad:
                    tile = _mask_tile(grad_mask, rows, cols)
                    tile += grad_logits.sum_to_size(tile.shape)
                if dot is not None:  # S_ij += q_i . k_j: dq_i += sum_j dS_ij k_j, dk_j += sum_i dS_ij q_i
                    grad_dot[0][..., rows, :] += grad_logits @ dot[1][..., cols, :]  # (..., bl, E)
                    grad_dot[1][..., cols, :] += grad_logits.transpose(-2, -1) @ dot[0][..., rows, :]  # (..., bs, E)
                grad = grad_logits.unsqueeze(0)  # (1, ..., bl, bs): back through the MLP, last layer first
                for (weight, _), grad_params, pre in zip(rest[::-1], grad_rest[::-1], pre_activations[::-1]):
                    grad_params[0] += grad.flatten(1) @ act(pre).flatten(1).T  # dW = g h^T  (out, in)
                    grad_params[1] += grad.flatten(1).sum(dim=1)  # db = sum g  (out,)
                    grad = (weight.T @ grad.flatten(1)).view(pre.shape) * act_grad(pre)  # (in, ..., bl, bs)
                grad_A_t[..., rows] += grad.sum(dim=-1)  # pre = A_i + Bk_j, so dA_i = sum_j d(pre_ij)
                grad_Bk_t[..., cols] += grad.sum(dim=-2)  # dBk_j = sum_i d(pre_ij)
        grads_rest = [g.to(param.dtype) for g, param in zip([g for pair in grad_rest for g in pair], rest_params)]
        grads_dot = (None, None) if dot is None else (grad_dot[0].to(q_dot.dtype), grad_dot[1].to(k_dot.dtype))
        return (grad_A_t.movedim(0, -1).to(A.dtype), grad_Bk_t.movedim(0, -1).to(Bk.dtype), grad_v.to(v.dtype),
                *grads_dot, None if grad_mask is None else grad_mask.to(attn_mask.dtype), None, None, None, None,
                *grads_rest)


def split_inputs(q, k, v, score, attn_mask):
    """What the tile backends take: A, Bk, v, q_dot, k_dot broadcast to the batch dims, the mask with as many dims
    as v, and the flat list of the remaining MLP layers' parameters (W2, b2, ..., Wn, bn), via score.split."""
    A, Bk, rest, dot = score.split(q, k, dot_term=True)  # (..., L, h1), (..., S, h1)
    batch = torch.broadcast_shapes(A.shape[:-2], Bk.shape[:-2], v.shape[:-2])
    L, S, width = A.shape[-2], Bk.shape[-2], A.shape[-1]
    A, Bk = A.expand(*batch, L, width), Bk.expand(*batch, S, width)  # (..., L, h1), (..., S, h1); views
    v = v.expand(*batch, S, v.shape[-1])  # (..., S, Ev)
    q_dot, k_dot = (None, None) if dot is None else (dot[0].expand(*batch, L, dot[0].shape[-1]),
                                                     dot[1].expand(*batch, S, dot[1].shape[-1]))  # (..., L|S, E)
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (len(batch) + 2 - attn_mask.dim()) + attn_mask.shape)  # (..., L|1, S|1)
    return A, Bk, v, q_dot, k_dot, attn_mask, [t for layer in rest for t in layer]


def check_block_sizes(block_l, block_s):
    """ValueError unless each tile size is None (the default) or a positive int."""
    for name, block in (("block_l", block_l), ("block_s", block_s)):
        if block is not None and (not isinstance(block, int) or block < 1):
            raise ValueError(f"{name} must be a positive int or None, got {block!r}")


def chunked_neural_attention(q, k, v, score, attn_mask=None, is_causal=False, *, block_l=None, block_s=None):
    """neural_attention(..., backend="chunked"): the same result and gradients as the reference in O(N) memory.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev), masks as in neural_attention (which validates
    the tensors and dispatches here). block_l / block_s: query / key rows per tile (default: default_block_size).
    """
    check_block_sizes(block_l, block_s)
    A, Bk, v, q_dot, k_dot, attn_mask, rest_params = split_inputs(q, k, v, score, attn_mask)
    default = default_block_size(math.prod(v.shape[:-2]), max(score.hidden), A.shape[-2], Bk.shape[-2])
    return ChunkedNeuralAttention.apply(A, Bk, v, q_dot, k_dot, attn_mask, is_causal, score.activation,
                                        block_l or default, block_s or default, *rest_params)
