"""Mask semantics shared by every attention backend (those of F.scaled_dot_product_attention).

A boolean attn_mask is True where a query may attend; a float mask is added to the logits; is_causal keeps key
j <= query i (top-left aligned) and combines with attn_mask. Rows with nothing to attend get zero weights.
"""
import math

import torch


def attention_bias(attn_mask, is_causal, L, S, dtype, device):
    """Additive logit bias (0 or -inf where masked) from attn_mask and is_causal, broadcastable to (..., L, S)."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, -math.inf)
        else:
            bias = attn_mask.to(dtype)
    if is_causal:
        future = torch.ones(L, S, dtype=torch.bool, device=device).triu(diagonal=1)  # (L, S) key after query
        causal = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(future, -math.inf)
        bias = causal if bias is None else bias + causal
    return bias


def masked_softmax(logits):
    """Softmax over the last dim that gives all-zero weights, not NaN, on rows whose logits are all -inf."""
    if logits.shape[-1] == 0:  # no keys at all: nothing to normalise
        return logits
    row_max = logits.amax(dim=-1, keepdim=True).detach()  # (..., L, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max)  # (..., L, S)
    total = p.sum(dim=-1, keepdim=True)  # (..., L, 1)
    return p / torch.where(total > 0, total, torch.ones_like(total))
