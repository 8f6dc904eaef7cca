"""Synthetic probe tasks for one attention head, and the probe itself with its training loop.

Every task draws a query point x_q and S key points x_j, each key carrying a value y_j ~ N(0, 1); the target is
the value of the one key that a relation between x_q and x_j selects, so a head that attends to exactly that key
scores test MSE 0 and predicting 0 scores 1.0.

- nearest_key: x in [-1, 1], the key nearest to the query, argmax_j -|x_q - x_j|.
- ring_key: x in [-1, 1], the key whose distance to the query is closest to 1/2, argmax_j -| |x_q - x_j| - 1/2 |.
- nearest_2d: x in [-1, 1]^2, the nearest key in Euclidean distance, argmax_j -||x_q - x_j||.
- extreme_key (control): x in [-1, 1], the largest key if x_q > 0 else the smallest, argmax_j x_q x_j.

With q = W_q x_q + b_q and k = W_k x_j + b_k a dot-product logit is affine in x_j for a fixed query, so it can
only favour the largest or the smallest key: enough for extreme_key, never for the other three, whose right
logits a neural score can express (DiGiugno & Mahmood 2025, Sec. 3).
"""
import torch
import torch.nn as nn

from .attention import dot_product_attention, neural_attention
from .scores import NeuralScore


def _select(values, logits):
    """The value of each row's highest-logit key: values (B, S, 1), logits (B, S) -> (B, 1, 1)."""
    return values.gather(1, logits.argmax(dim=1).view(-1, 1, 1))


def _points(batch, count, dim, generator):
    return torch.rand(batch, count, dim, generator=generator) * 2 - 1  # (B, count, dim) uniform in [-1, 1]


def nearest_key_task(batch, num_keys, generator=None):
    """(queries (B, 1, 1), keys (B, S, 1), values (B, S, 1), target (B, 1, 1)) for the nearest-key task."""
    queries, keys = _points(batch, 1, 1, generator), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -(queries - keys).abs().squeeze(-1))


def ring_key_task(batch, num_keys, generator=None):
    """Like nearest_key_task, but the target key is the one at distance closest to 1/2 from the query."""
    queries, keys = _points(batch, 1, 1, generator), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -((queries - keys).abs() - 0.5).abs().squeeze(-1))


def nearest_2d_task(batch, num_keys, generator=None):
    """(queries (B, 1, 2), keys (B, S, 2), values (B, S, 1), target (B, 1, 1)): the nearest key in the plane."""
    queries, keys = _points(batch, 1, 2, generator), _points(batch, num_keys, 2, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -(queries - keys).norm(dim=-1))


def extreme_key_task(batch, num_keys, generator=None):
    """The control: the target key maximizes x_q x_j, a relation one dot-product head expresses exactly."""
    queries, keys = _points(batch, 1, 1, generator), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, (queries * keys).squeeze(-1))


TASKS = {"nearest_key": nearest_key_task, "ring_key": ring_key_task, "nearest_2d": nearest_2d_task,
         "extreme_key": extreme_key_task}


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
            out = neural_attention(q, k, v, self.score, backend="reference")
        return self.to_out(out)  # (B, L, 1)


def train_probe(kind, seed, steps=1500, num_keys=8, batch=256, head_dim=16, proj_dim=None, lr=3e-3,
                score_options=None, task=nearest_key_task, test_size=4096, progress=None):
    """Train one AttentionProbe with Adam on fresh batches; returns {"losses": [...], "test_mse": float, "model"}.

    task is a name in TASKS or a function like nearest_key_task; score_options go to NeuralScore. The model's
    init depends on seed only, the training batches on seed and task, the test set on seed + 10,000.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)} or a function, got {task!r}")
        task = TASKS[task]
    in_dim = task(1, num_keys, generator=torch.Generator().manual_seed(0))[0].shape[-1]  # the task's point size
    torch.manual_seed(seed)
    model = AttentionProbe(in_dim, head_dim, kind, proj_dim, score_options)
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
    return {"losses": losses, "test_mse": test_mse, "model": model}
