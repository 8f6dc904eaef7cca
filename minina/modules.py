"""Multi-head attention with a replaceable score (dot or neural) and the pre-LayerNorm Transformer block."""
import torch
import torch.nn as nn

from .attention import attention_weights, check_backend, dot_product_attention, neural_attention, sdpa_attention
from .scores import NeuralScore

KINDS = ("dot", "neural")


def check_score_options(score_options):
    """Raise TypeError unless score_options (NeuralScore's keyword arguments) is None or a dict."""
    if score_options is not None and not isinstance(score_options, dict):
        raise TypeError(f"score_options must be a dict of NeuralScore keyword arguments or None, got "
                        f"{type(score_options).__name__}")


class MultiHeadAttention(nn.Module):
    """Heads of dot-product or neural attention over x (self) or context (cross); forward (B, L, dim) -> (B, L, dim).

    For kind="neural" one NeuralScore(head_dim, proj_dim, **score_options) is shared by all heads, as in the
    paper, and backend chooses how neural_attention runs. For kind="dot", backend="reference" runs the written-out
    dot_product_attention and every other backend F.scaled_dot_product_attention (sdpa_attention: PyTorch's fused
    kernels, no (B, H, L, S) tensor kept), with equal results. dropout acts on the output projection (attention
    weights are never materialized by the fast paths).
    """

    def __init__(self, dim, heads, kind="dot", is_causal=False, head_dim=None, proj_dim=None, dropout=0.0,
                 backend="auto", score_options=None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        check_backend(backend)
        check_score_options(score_options)
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when head_dim is not given")
            head_dim = dim // heads
        self.dim, self.heads, self.head_dim, self.kind = dim, heads, head_dim, kind
        self.is_causal, self.backend = is_causal, backend
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)
        if kind == "neural":
            self.score = NeuralScore(head_dim, proj_dim, **(score_options or {}))
        elif proj_dim is not None or score_options:
            raise ValueError("proj_dim and score_options apply to kind='neural' only")

    def extra_repr(self):
        return f"kind={self.kind!r}, heads={self.heads}, head_dim={self.head_dim}, is_causal={self.is_causal}"

    def _heads(self, x, context):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, L, {self.dim}), got {tuple(x.shape)}")
        context = x if context is None else context
        if context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have shape ({x.shape[0]}, S, {self.dim}), got {tuple(context.shape)}")
        B, L, S, H = x.shape[0], x.shape[1], context.shape[1], self.heads
        q = self.to_q(x).view(B, L, H, self.head_dim).transpose(1, 2)  # (B, H, L, E)
        k, v = self.to_kv(context).view(B, S, 2, H, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, S, E) each
        return q, k, v

    def forward(self, x, context=None, attn_mask=None):
        """x (B, L, dim), context (B, S, dim) or None, attn_mask broadcastable to (B, H, L, S) -> (B, L, dim)."""
        q, k, v = self._heads(x, context)
        if self.kind == "dot":
            attention = dot_product_attention if self.backend == "reference" else sdpa_attention
            out = attention(q, k, v, attn_mask=attn_mask, is_causal=self.is_causal)  # (B, H, L, E)
        else:
            out = neural_attention(q, k, v, self.score, attn_mask=attn_mask, is_causal=self.is_causal,
                                   backend=self.backend)  # (B, H, L, E)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, L, H*E)
        return self.dropout(self.to_out(out))

    @torch.no_grad()
    def attention_weights(self, x, context=None, attn_mask=None):
        """The (B, H, L, S) attention matrix this layer applies, for inspection and plots."""
        q, k, _ = self._heads(x, context)
        score = self.score if self.kind == "neural" else None
        return attention_weights(q, k, score, attn_mask=attn_mask, is_causal=self.is_causal)


class FeedForward(nn.Sequential):
    """The position-wise MLP dim -> hidden -> dim with GELU."""

    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    proj_dim and score_options are the neural score's: a dot block ignores them, so that a model can hand the same
    options to all its blocks.
    """

    def __init__(self, dim, heads, kind="dot", is_causal=False, mlp_ratio=4, dropout=0.0, head_dim=None,
                 proj_dim=None, backend="auto", score_options=None):
        super().__init__()
        check_score_options(score_options)  # checked here too: a dot block does not pass it on
        neural = kind == "neural"
        self.ln_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, kind=kind, is_causal=is_causal, head_dim=head_dim,
                                       proj_dim=proj_dim if neural else None, dropout=dropout, backend=backend,
                                       score_options=score_options if neural else None)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio * dim, dropout)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_attn(x), attn_mask=attn_mask)  # (B, L, dim)
        return x + self.mlp(self.ln_mlp(x))
