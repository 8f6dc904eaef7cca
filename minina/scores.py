"""The paper's score function: a small MLP on a (query, key) pair (DiGiugno & Mahmood 2025, Sec. 3)."""
import math

import torch
import torch.nn as nn

from .activations import ACTIVATIONS

# The options `python -m minina study-learnability` recommends: NeuralScore(head_dim, **RELIABLE_SCORE_OPTIONS).
# The measurements behind the choice are in docs/learnability.md, where the study re-measures them.
RELIABLE_SCORE_OPTIONS = {"hidden": "wide", "activation": "gelu"}
# The options it measured and rejected, which NeuralScore does not take (minina.tools.candidates.CandidateScore
# does, for the study's probes): named here so that a training run can say why it refuses one without importing
# the study.
REJECTED_SCORE_OPTIONS = ("init", "learn_scale", "scale_init", "bias_init", "zero_last")  # and activation="leaky_relu"


def default_proj_dim(head_dim):
    """d' = floor(head_dim / 32), at least 2 (the paper's released code: head_dim // 32, no floor; d' = 2 at 64)."""
    return max(2, head_dim // 32)


class NeuralScore(nn.Module):
    """s(q_i, k_j) = MLP([q_proj(q_i); k_proj(k_j)]), shared by all heads.

    With proj_dim P the MLP is 2P -> hidden[0] -> ... -> hidden[-1] -> 1 with the activation ("relu", the
    paper's, or "gelu") between layers; the paper's hidden widths are (P, P // 2), each at least 1
    (hidden="paper", the default); hidden="wide" is (P, P). No 1/sqrt(d) scaling is applied. The defaults
    reproduce the paper; RELIABLE_SCORE_OPTIONS are the options `python -m minina study-learnability` recommends
    (docs/learnability.md, "Training reliably").

    residual=True adds the scaled dot product, s = MLP(...) + q_i . k_j / sqrt(head_dim), and zeroes the MLP's
    last layer, so training starts from dot-product attention (one extra dot product per pair; every backend
    takes it). The options the study measured and rejected live with it, in minina.tools.candidates.
    """

    def __init__(self, head_dim, proj_dim=None, hidden=None, activation="relu", residual=False):
        super().__init__()
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        proj_dim = default_proj_dim(head_dim) if proj_dim is None else proj_dim
        if not isinstance(proj_dim, int) or proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int, got {proj_dim!r}")
        if hidden is None or hidden == "paper":
            hidden = (proj_dim, max(1, proj_dim // 2))
        elif hidden == "wide":
            hidden = (proj_dim, proj_dim)  # a last hidden layer as wide as the first: more units to keep alive
        elif isinstance(hidden, str):
            raise ValueError(f"hidden must be 'paper', 'wide' or a sequence of positive ints, got {hidden!r}")
        hidden = tuple(hidden)
        if len(hidden) == 0 or any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
        self.head_dim, self.proj_dim, self.hidden = head_dim, proj_dim, hidden
        self.activation, self.residual = activation, residual
        self.q_proj = nn.Linear(head_dim, proj_dim)
        self.k_proj = nn.Linear(head_dim, proj_dim)
        widths = (2 * proj_dim, *hidden, 1)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            if i > 0:
                layers.append(ACTIVATIONS[activation].module())
            layers.append(nn.Linear(fan_in, fan_out))
        self.mlp = nn.Sequential(*layers)
        if residual:  # the MLP starts at 0: attention starts as scaled dot-product attention
            nn.init.zeros_(self.linears()[-1].weight)
            nn.init.zeros_(self.linears()[-1].bias)

    def extra_repr(self):
        return (f"head_dim={self.head_dim}, proj_dim={self.proj_dim}, hidden={self.hidden}, "
                f"activation={self.activation!r}{', residual=True' if self.residual else ''}")

    def linears(self):
        """The MLP's nn.Linear layers in order."""
        return [m for m in self.mlp if isinstance(m, nn.Linear)]

    def logits(self, q, k):
        """Materialize every pair score, as the paper does: (..., L, E), (..., S, E) -> (..., L, S)."""
        a, b = self.q_proj(q), self.k_proj(k)  # (..., L, P), (..., S, P)
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        L, S, P = a.shape[-2], b.shape[-2], self.proj_dim
        pairs = torch.cat([a.unsqueeze(-2).expand(*batch, L, S, P),
                           b.unsqueeze(-3).expand(*batch, L, S, P)], dim=-1)  # (..., L, S, 2P)
        logits = self.mlp(pairs).squeeze(-1)  # (..., L, S)
        if self.residual:
            logits = logits + (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (..., L, S)
        return logits

    def split(self, q, k, residual_term=False):
        """Split the first layer over the concatenation, for backends that never build the pair tensor.

        W1 [a; b] + c = (W1_q a + c) + W1_k b, so the first hidden layer of pair (i, j) is act(A_i + Bk_j) with
        A = W1_q q_proj(q) + c of shape (..., L, hidden[0]) and Bk = W1_k k_proj(k) of shape (..., S, hidden[0]).
        Returns (A, Bk, rest): rest is the list of (weight, bias) of the remaining linear layers. A backend that
        adds the residual term passes residual_term=True and gets (A, Bk, rest, residual): residual is
        (q / sqrt(head_dim), k), whose pair products the score adds, or None without residual=True; other backends
        cannot take residual scores.
        """
        if self.residual and not residual_term:
            raise ValueError("NeuralScore(residual=True) adds q . k / sqrt(head_dim) to the MLP, which this backend "
                             "does not implement; use one of minina's backends")
        first, *rest = self.linears()
        w_q, w_k = first.weight[:, : self.proj_dim], first.weight[:, self.proj_dim:]  # (h1, P) each
        A = self.q_proj(q) @ w_q.T + first.bias  # (..., L, h1)
        Bk = self.k_proj(k) @ w_k.T  # (..., S, h1)
        rest = [(layer.weight, layer.bias) for layer in rest]
        if not residual_term:
            return A, Bk, rest
        return A, Bk, rest, ((q / math.sqrt(self.head_dim), k) if self.residual else None)
