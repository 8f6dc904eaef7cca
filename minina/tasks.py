"""Synthetic probe tasks whose right query-key relation one dot-product head cannot express, and a one-layer probe.

nearest_key: a query point x_q and S key points x_j in [-1, 1], each key carrying a value y_j ~ N(0, 1); the target
is the value of the key nearest to the query. For a fixed query a dot-product logit is affine in x_j, so its
attention can only favour the largest or smallest x_j, never the nearest; a neural score can learn -|x_q - x_j|.
"""
import torch
import torch.nn as nn

from .attention import dot_product_attention, neural_attention
from .scores import NeuralScore


def nearest_key_task(batch, num_keys, generator=None):
    """(queries (B, 1, 1), keys (B, S, 1), values (B, S, 1), target (B, 1, 1)) for the nearest-key task."""
    queries = torch.rand(batch, 1, 1, generator=generator) * 2 - 1
    keys = torch.rand(batch, num_keys, 1, generator=generator) * 2 - 1
    values = torch.randn(batch, num_keys, 1, generator=generator)
    nearest = (queries - keys).abs().argmin(dim=1, keepdim=True)  # (B, 1, 1)
    return queries, keys, values, values.gather(1, nearest)


class AttentionProbe(nn.Module):
    """One attention head reading raw features: q = W_q x_q, k = W_k x_k, v = W_v y; output (B, L, 1)."""

    def __init__(self, in_dim, head_dim, kind="dot", proj_dim=None, score_options=None):
        super().__init__()
        if kind not in ("dot", "neural"):
            raise ValueError(f"kind must be 'dot' or 'neural', got {kind!r}")
        self.kind = kind
        self.to_q, self.to_k = nn.Linear(in_dim, head_dim), nn.Linear(in_dim, head_dim)
        self.to_v, self.to_out = nn.Linear(1, head_dim), nn.Linear(head_dim, 1)
        if kind == "neural":
            self.score = NeuralScore(head_dim, proj_dim, **(score_options or {}))

    def forward(self, queries, keys, values):
        q, k, v = self.to_q(queries), self.to_k(keys), self.to_v(values)  # (B, L, E), (B, S, E), (B, S, E)
        if self.kind == "dot":
            out = dot_product_attention(q, k, v)
        else:
            out = neural_attention(q, k, v, self.score)
        return self.to_out(out)  # (B, L, 1)


def train_probe(kind, seed, steps=1500, num_keys=8, batch=256, head_dim=16, proj_dim=None, lr=3e-3,
                score_options=None, task=nearest_key_task, test_size=4096, progress=None):
    """Train one AttentionProbe with Adam on fresh batches; returns {"losses": [...], "test_mse": float}."""
    torch.manual_seed(seed)
    model = AttentionProbe(1, head_dim, kind, proj_dim, score_options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        *inputs, target = task(batch, num_keys, generator=data)
        loss = (model(*inputs) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
    *inputs, target = task(test_size, num_keys, generator=torch.Generator().manual_seed(10_000 + seed))
    with torch.no_grad():
        test_mse = (model(*inputs) - target).pow(2).mean().item()
    return {"losses": losses, "test_mse": test_mse}
