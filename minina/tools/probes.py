"""Synthetic probe tasks for one attention head, and the probe itself (AttentionProbe) with its training loop.

Every task draws a query point x_q and S key points x_j, each key carrying a value y_j ~ N(0, 1); the target is
the value of the one key that a relation between x_q and x_j selects, so a head that attends to exactly that key
scores test MSE 0 and predicting 0 scores 1.0.

- nearest_key: x in [-1, 1], the key nearest to the query, argmax_j -|x_q - x_j|.
- ring_key: x in [-1, 1], the key whose distance to the query is closest to 1/2, argmax_j -| |x_q - x_j| - 1/2 |.
- nearest_2d: x in [-1, 1]^2, the nearest key in Euclidean distance, argmax_j -||x_q - x_j||.
- extreme_key (control): x in [-1, 1], the largest key if x_q > 0 else the smallest, argmax_j x_q x_j.

A second family, held out (minina.tools.study never chooses an option on it), has other shapes and sizes; some targets
are the mean value of a set of keys rather than one key's value (predicting 0 then scores the mean of 1 / |set|):

- ball_mean: x in [-1, 1], the query carries a radius r ~ U[0.1, 0.5] too, x_q' = (x_q, r); the mean value of
  the keys with |x_q - x_j| <= r (the nearest key when none is).
- annulus_2d: x in [-1, 1]^2, the mean value of the keys with 0.3 <= ||x_q - x_j|| <= 0.7 (when none is, the key
  whose distance is closest to 1/2).
- k_nearest: x in [-1, 1], the mean value of the 3 keys nearest to the query.
- nearest_3d: x in [-1, 1]^3, the nearest key in Euclidean distance.

With q = W_q x_q + b_q and k = W_k x_j + b_k a dot-product logit is affine in x_j for a fixed query, so it can
only favour the largest or the smallest key: enough for extreme_key, never for the other three, whose right
logits a neural score can express (DiGiugno & Mahmood 2025, Sec. 3). The same holds in more dimensions: an affine
logit favours the keys furthest along one direction, never those near the query, in a ball or in an annulus.
Every task takes queries=... to fix the query points (B, 1, D) and draw only keys and values for them.
"""
import torch
import torch.nn as nn

from ..attention import dot_product_attention, neural_attention
from .candidates import CandidateScore


def _select(values, logits):
    """The value of each row's highest-logit key: values (B, S, 1), logits (B, S) -> (B, 1, 1)."""
    return values.gather(1, logits.argmax(dim=1).view(-1, 1, 1))


def _points(batch, count, dim, generator):
    return torch.rand(batch, count, dim, generator=generator) * 2 - 1  # (B, count, dim) uniform in [-1, 1]


def _queries(batch, dim, generator, queries):
    """Fresh query points (B, 1, dim), or the given ones (checked), so a task can be drawn for fixed queries."""
    if queries is None:
        return _points(batch, 1, dim, generator)
    if queries.shape != (batch, 1, dim):
        raise ValueError(f"queries must have shape (batch, 1, {dim}) = {(batch, 1, dim)}, got {tuple(queries.shape)}")
    return queries


def nearest_key_task(batch, num_keys, generator=None, queries=None):
    """(queries (B, 1, 1), keys (B, S, 1), values (B, S, 1), target (B, 1, 1)) for the nearest-key task."""
    queries, keys = _queries(batch, 1, generator, queries), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -(queries - keys).abs().squeeze(-1))


def ring_key_task(batch, num_keys, generator=None, queries=None):
    """Like nearest_key_task, but the target key is the one at distance closest to 1/2 from the query."""
    queries, keys = _queries(batch, 1, generator, queries), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -((queries - keys).abs() - 0.5).abs().squeeze(-1))


def nearest_2d_task(batch, num_keys, generator=None, queries=None):
    """(queries (B, 1, 2), keys (B, S, 2), values (B, S, 1), target (B, 1, 1)): the nearest key in the plane."""
    queries, keys = _queries(batch, 2, generator, queries), _points(batch, num_keys, 2, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -(queries - keys).norm(dim=-1))


def extreme_key_task(batch, num_keys, generator=None, queries=None):
    """The control: the target key maximizes x_q x_j, a relation one dot-product head expresses exactly."""
    queries, keys = _queries(batch, 1, generator, queries), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, (queries * keys).squeeze(-1))


def _mean_over(values, inside, fallback_logits):
    """The mean value of each row's keys where inside (B, S) is True, or of its highest-logit key when none is."""
    fallback = torch.nn.functional.one_hot(fallback_logits.argmax(dim=1), inside.shape[1]).bool()  # (B, S)
    chosen = torch.where(inside.any(dim=1, keepdim=True), inside, fallback).to(values.dtype)  # (B, S)
    weights = chosen / chosen.sum(dim=1, keepdim=True)  # (B, S), each row sums to 1
    return weights.unsqueeze(1) @ values  # (B, 1, S) @ (B, S, 1) -> (B, 1, 1)


def ball_mean_task(batch, num_keys, generator=None, queries=None):
    """(queries (B, 1, 2) = (x_q, r), keys (B, S, 1), values, target): the mean value within radius r of x_q.

    r ~ U[0.1, 0.5] varies per query; when no key lies within r, the target is the nearest key's value.
    """
    if queries is None:
        queries = torch.cat([_points(batch, 1, 1, generator),
                             0.1 + 0.4 * torch.rand(batch, 1, 1, generator=generator)], dim=-1)  # (B, 1, 2)
    queries = _queries(batch, 2, generator, queries)
    keys = _points(batch, num_keys, 1, generator)  # (B, S, 1)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    distance = (queries[..., :1] - keys).abs().squeeze(-1)  # (B, S)
    return queries, keys, values, _mean_over(values, distance <= queries[..., 1], -distance)


def annulus_2d_task(batch, num_keys, generator=None, queries=None):
    """(queries (B, 1, 2), keys (B, S, 2), values, target): the mean value of the keys at distance 0.3 to 0.7."""
    queries, keys = _queries(batch, 2, generator, queries), _points(batch, num_keys, 2, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    distance = (queries - keys).norm(dim=-1)  # (B, S)
    return queries, keys, values, _mean_over(values, (distance >= 0.3) & (distance <= 0.7), -(distance - 0.5).abs())


def k_nearest_task(batch, num_keys, generator=None, queries=None, k=3):
    """(queries (B, 1, 1), keys (B, S, 1), values, target): the mean value of the k keys nearest to the query."""
    if not 1 <= k <= num_keys:
        raise ValueError(f"need 1 <= k <= num_keys, got k={k}, num_keys={num_keys}")
    queries, keys = _queries(batch, 1, generator, queries), _points(batch, num_keys, 1, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    distance = (queries - keys).abs().squeeze(-1)  # (B, S)
    nearest = torch.zeros_like(distance, dtype=torch.bool).scatter(1, distance.topk(k, largest=False).indices, True)
    return queries, keys, values, _mean_over(values, nearest, -distance)


def nearest_3d_task(batch, num_keys, generator=None, queries=None):
    """(queries (B, 1, 3), keys (B, S, 3), values (B, S, 1), target (B, 1, 1)): the nearest key in space."""
    queries, keys = _queries(batch, 3, generator, queries), _points(batch, num_keys, 3, generator)
    values = torch.randn(batch, num_keys, 1, generator=generator)
    return queries, keys, values, _select(values, -(queries - keys).norm(dim=-1))


# every task by name: the four probes the study chooses options on, then the held-out family (minina.tools.study)
TASKS = {"nearest_key": nearest_key_task, "ring_key": ring_key_task, "nearest_2d": nearest_2d_task,
         "extreme_key": extreme_key_task, "ball_mean": ball_mean_task, "annulus_2d": annulus_2d_task,
         "k_nearest": k_nearest_task, "nearest_3d": nearest_3d_task}


class AttentionProbe(nn.Module):
    """One attention head reading raw features: q = W_q x_q, k = W_k x_k, v = W_v y; output (B, L, 1).

    Keys have in_dim features too unless key_dim says otherwise (ball_mean's queries carry a radius). The neural
    kind scores with a CandidateScore, so score_options may name any option the study measures.
    """

    def __init__(self, in_dim, head_dim, kind="dot", proj_dim=None, score_options=None, key_dim=None):
        super().__init__()
        if kind not in ("dot", "neural"):
            raise ValueError(f"kind must be 'dot' or 'neural', got {kind!r}")
        self.kind = kind
        self.to_q = nn.Linear(in_dim, head_dim)
        self.to_k = nn.Linear(in_dim if key_dim is None else key_dim, head_dim)
        self.to_v, self.to_out = nn.Linear(1, head_dim), nn.Linear(head_dim, 1)
        if kind == "neural":
            self.score = CandidateScore(head_dim, proj_dim, **(score_options or {}))

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

    task is a name in TASKS or a function like nearest_key_task; score_options go to CandidateScore (NeuralScore's
    options and the study's candidates). The model's init depends on seed only, the training batches on seed and
    task, the test set on seed + 10,000.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)} or a function, got {task!r}")
        task = TASKS[task]
    queries, keys, _, _ = task(1, num_keys, generator=torch.Generator().manual_seed(0))  # the task's point sizes
    torch.manual_seed(seed)
    model = AttentionProbe(queries.shape[-1], head_dim, kind, proj_dim, score_options, key_dim=keys.shape[-1])
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
