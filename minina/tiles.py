"""One tile of neural attention: what every tiled backend takes, and the math of one (query block x key block) tile.

The first layer of the paper's pair MLP splits over the concatenation, W1 [a_i; b_j] + c = (W1_q a_i + c) + W1_k b_j
(NeuralScore.split), so a backend needs A (..., L, h1) and Bk (..., S, h1) once, and the score of pair (i, j) is the
rest of the MLP applied to act(A_i + Bk_j). split_inputs hands the backends one TileInputs, in one order: the
chunked walk (eager or compiled, minina.chunked) and the fused Triton kernels (minina.triton_kernels) take exactly
these tensors. Below are the forward and backward of one tile, FlashAttention-2's (Dao 2023, Alg. 1 and 2) with
the dot product replaced by the MLP; minina.chunked runs them eagerly or fused by torch.compile.

The tile is plain elementwise PyTorch with the MLP unrolled over its hidden units (each unit its own (..., bl, bs)
expression, each weight a scalar of one flat tensor): the paper's MLP costs about ten scalar operations per pair,
and torch.compile fuses the whole tile into a few loops around the p @ v products, so hidden values never reach
memory (a matmul over the hidden dim would be an external call that breaks the fusion). Positions reach the tile
in a tensor, `offsets`, so a compiled tile serves every query and key block.
"""
import functools
import math
from typing import NamedTuple, Optional

import torch

from .activations import ACTIVATIONS


class TileInputs(NamedTuple):
    """The tensors every tiled backend takes, in this order, broadcast to common batch dims (...)."""

    A: torch.Tensor  # (..., L, h1): W1_q q_proj(q) + c
    Bk: torch.Tensor  # (..., S, h1): W1_k k_proj(k)
    v: torch.Tensor  # (..., S, Ev)
    q_residual: Optional[torch.Tensor]  # (..., L, E): a residual score's q / sqrt(E), else None
    k_residual: Optional[torch.Tensor]  # (..., S, E): its k, else None
    attn_mask: Optional[torch.Tensor]  # bool (True = may attend) or float (added), (..., L|1, S|1), else None
    weights: torch.Tensor  # (n,): W2, b2, ..., Wn, bn of the MLP layers after the split one, flattened


def split_inputs(q, k, v, score, attn_mask):
    """TileInputs of a neural attention call, and the widths (h1, h2, ..., 1) of the MLP after its split layer."""
    A, Bk, rest, residual = score.split(q, k, residual_term=True)  # (..., L, h1), (..., S, h1)
    batch = torch.broadcast_shapes(A.shape[:-2], Bk.shape[:-2], v.shape[:-2])
    L, S, width = A.shape[-2], Bk.shape[-2], A.shape[-1]
    q_residual = k_residual = None
    if residual is not None:
        q_residual = residual[0].expand(*batch, L, residual[0].shape[-1])  # (..., L, E)
        k_residual = residual[1].expand(*batch, S, residual[1].shape[-1])  # (..., S, E)
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (len(batch) + 2 - attn_mask.dim()) + attn_mask.shape)  # (..., L|1, S|1)
    inputs = TileInputs(A.expand(*batch, L, width), Bk.expand(*batch, S, width), v.expand(*batch, S, v.shape[-1]),
                        q_residual, k_residual, attn_mask, torch.cat([t.reshape(-1) for layer in rest for t in layer]))
    return inputs, (width, *[weight.shape[0] for weight, _ in rest])


def first_order_backward(backward):
    """Decorator for the backward of a Function written without a graph of its own (its forward sets ctx.backend):
    raise when autograd asks it to build one (create_graph=True). once_differentiable raises only when the incoming
    gradient requires grad, so a loss linear in the output would get a second derivative that silently lacks the
    backward's own terms."""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():  # autograd runs a backward in grad mode exactly when create_graph=True
            raise RuntimeError(f"backend={ctx.backend!r} has no double backward: its backward cannot build a graph "
                               "(create_graph=True); use backend='reference' to differentiate twice")
        return backward(ctx, *grads)
    return checked


def _layers(weights, widths):
    """The (weight (out, in), bias (out,)) views of each layer in the flat weights."""
    layers, start = [], 0
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers.append((weights[start: start + fan_out * fan_in].view(fan_out, fan_in),
                       weights[start + fan_out * fan_in: start + fan_out * (fan_in + 1)]))
        start += fan_out * (fan_in + 1)
    return layers


def _weighted_sum(weights, inputs, bias=None):
    """bias + sum_u weights[u] * inputs[u] over (..., bl, bs) tensors and scalar weights, one fused multiply-add
    per input."""
    out = inputs[0] * weights[0] if bias is None else torch.addcmul(bias, inputs[0], weights[0])
    for weight, x in zip(weights[1:], inputs[1:]):
        out = torch.addcmul(out, x, weight)
    return out


def tile_logits(A, Bk, weights, offsets, mask, q_residual, k_residual, widths, activation, positions):
    """Scores of one tile, unrolled: A (h1, ..., bl), Bk (h1, ..., bs) -> (..., bl, bs) and, per hidden layer, its
    pre-activations and activations (lists of one (..., bl, bs) tensor per unit). Masked and padded pairs get -inf.

    offsets: a tensor (first query row, first key, S, is_causal), so that neither positions nor causality change
    the computation; mask: the tile's (..., bl|1, bs|1) block or None; positions: whether to mask padding keys and
    (if causal) future keys, which compiled tiles always do and eager ones on the diagonal only.
    """
    act = ACTIVATIONS[activation].function
    pre = [A[unit].unsqueeze(-1) + Bk[unit].unsqueeze(-2) for unit in range(widths[0])]  # A_i + Bk_j per unit
    layers = []
    for weight, bias in _layers(weights, widths):
        hidden = [act(x) for x in pre]
        layers.append((pre, hidden))
        pre = [_weighted_sum(weight[o], hidden, bias[o]) for o in range(weight.shape[0])]  # W h + b, per unit
    logits = pre[0]  # (..., bl, bs)
    if q_residual is not None:
        logits = logits + q_residual @ k_residual.transpose(-2, -1)  # + q_i . k_j / sqrt(E)
    if mask is not None and mask.dtype != torch.bool:
        logits = logits + mask
    bl, bs = logits.shape[-2:]
    if positions:
        rows = offsets[0] + torch.arange(bl, device=logits.device)  # (bl,) query positions
        cols = offsets[1] + torch.arange(bs, device=logits.device)  # (bs,) key positions
        keep = (cols < offsets[2]).expand(bl, -1)  # (bl, bs) real keys, not padding
        keep = keep & ((cols <= rows.unsqueeze(-1)) | (offsets[3] == 0))  # causal: key j <= query i
        logits = logits.masked_fill(~(keep if mask is None or mask.dtype != torch.bool else keep & mask), -math.inf)
    elif mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, -math.inf)
    return logits, layers


def forward_tile(A, Bk, v, weights, offsets, mask, q_residual, k_residual, row_max, row_sum, acc, *, widths,
                 activation, positions):
    """One online-softmax step over a key block: (m_i, l_i, acc) -> updated, with v (..., bs, Ev)."""
    logits, _ = tile_logits(A, Bk, weights, offsets, mask, q_residual, k_residual, widths, activation, positions)
    new_max = torch.maximum(row_max, logits.amax(dim=-1))  # m_new = max(m_i, rowmax(S_ij))
    safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)  # a row masked so far stays at 0 weight
    rescale = torch.exp(row_max - safe_max)  # exp(m_i - m_new)
    p = torch.exp(logits - safe_max.unsqueeze(-1))  # P_ij = exp(S_ij - m_new)  (..., bl, bs)
    row_sum = row_sum * rescale + p.sum(dim=-1)  # l_i = l_i exp(m_i - m_new) + rowsum(P_ij)
    acc = acc * rescale.unsqueeze(-1) + p @ v  # (..., bl, Ev)
    return new_max, row_sum, acc


def _mlp_backward(grad_logits, layers, weights, widths, activation):
    """Back through the unrolled MLP: dS (..., bl, bs) -> flat weight gradients, dA (h1, ..., bl), dBk (h1, ..., bs)."""
    act_grad = ACTIVATIONS[activation].derivative
    grads, pieces = [grad_logits], []
    for (weight, _), (pre, hidden) in zip(reversed(_layers(weights, widths)), reversed(layers)):
        fan_out, fan_in = weight.shape
        grad_weight = [(grads[o] * hidden[u]).sum() for o in range(fan_out) for u in range(fan_in)]  # dW = g h^T
        pieces = [torch.stack(grad_weight), torch.stack([g.sum() for g in grads])] + pieces  # db = sum g
        grads = [_weighted_sum(weight[:, u], grads) * act_grad(pre[u]) for u in range(fan_in)]  # W^T g * act'(pre)
    grad_A = torch.stack([g.sum(dim=-1) for g in grads])  # pre = A_i + Bk_j: dA_i = sum_j d(pre_ij)
    grad_Bk = torch.stack([g.sum(dim=-2) for g in grads])  # dBk_j = sum_i d(pre_ij)
    return torch.cat(pieces), grad_A, grad_Bk


def backward_tile(A, Bk, v, weights, offsets, mask, q_residual, k_residual, grad_out, delta, logsumexp, *, widths,
                  activation, positions, mask_grad):
    """FlashAttention-2's backward for one tile: the gradients of A, Bk, v, the flat weights, the mask tile (or
    None) and the residual's q, k (or None) contributed by these pairs."""
    logits, layers = tile_logits(A, Bk, weights, offsets, mask, q_residual, k_residual, widths, activation, positions)
    p = torch.exp(logits - logsumexp.unsqueeze(-1))  # P_ij = exp(S_ij - LSE_i)  (..., bl, bs)
    grad_v = p.transpose(-2, -1) @ grad_out  # dV_j = P_ij^T dO_i  (..., bs, Ev)
    grad_p = grad_out @ v.transpose(-2, -1)  # dP_ij = dO_i V_j^T  (..., bl, bs)
    grad_logits = p * (grad_p - delta.unsqueeze(-1))  # dS_ij = P_ij (dP_ij - D_i)
    grad_mask = grad_logits.sum_to_size(mask.shape) if mask_grad else None
    grad_q = grad_k = None
    if q_residual is not None:  # S_ij += q_i . k_j: dq_i = sum_j dS_ij k_j, dk_j = sum_i dS_ij q_i
        grad_q = grad_logits @ k_residual  # (..., bl, E)
        grad_k = grad_logits.transpose(-2, -1) @ q_residual  # (..., bs, E)
    grad_weights, grad_A, grad_Bk = _mlp_backward(grad_logits, layers, weights, widths, activation)
    return grad_A, grad_Bk, grad_v, grad_weights, grad_mask, grad_q, grad_k
