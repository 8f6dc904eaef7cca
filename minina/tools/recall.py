"""The recall task: the probe tasks' relations as a sequence task for Transformers.

recall_episodes draws num_pairs tokens "k:v" with keys in [0, num_keys), a query "q", and the answer "v" of the pair
whose key the relation selects; recall_corpus lays episodes out as a token stream for `python -m minina train
--task lm` (datasets recall_ring and recall_nearest). With AffineKeyEmbedding a key enters a TransformerLM as a
number (affine in the key), the theorem's setting, where one dot-product head cannot single out both sides of the
ring; a lookup embedding, or a second block whose MLP builds nonlinear key features, can approximate it (notebook
08). recall_baseline and recall_blind_accuracy give what a model that ignores the query can reach.
"""
import itertools
from collections import Counter

import torch
import torch.nn as nn

from .corpus import TextCorpus

RELATIONS = ("nearest", "ring")


def recall_vocab(num_keys=32, num_values=4):
    """Token strings of the recall task: pair tokens "k3:v5", query tokens "q3", answer tokens "v5", separator "|"."""
    return ([f"k{k}:v{v}" for k in range(num_keys) for v in range(num_values)] + [f"q{k}" for k in range(num_keys)]
            + [f"v{v}" for v in range(num_values)] + ["|"])


def recall_target(queries, keys, relation="ring", num_keys=32):
    """Index of the selected pair and a tie flag: queries (N,), keys (N, n) ints -> (N,), (N,) bool.

    nearest: the key closest to the query, argmin_j |q - k_j|; ring: the key whose distance to the query is
    closest to num_keys / 4, argmin_j | |q - k_j| - num_keys / 4 |. A row ties when two keys are equally good.
    """
    distance = (queries.unsqueeze(-1) - keys).abs().double()  # (N, n)
    cost = distance if relation == "nearest" else (distance - num_keys / 4).abs()
    best = cost.min(dim=-1, keepdim=True).values  # (N, 1)
    return cost.argmin(dim=-1), (cost == best).sum(dim=-1) > 1


def recall_episodes(count, num_pairs=6, num_keys=32, num_values=4, relation="ring", generator=None):
    """count episodes of associative recall by nearness, as token ids (count, num_pairs + 2).

    Each episode is num_pairs tokens "k:v" (distinct keys in [0, num_keys), values in [0, num_values)), then a
    query token "q" (any key value, present or not), then the answer token "v" of the pair that `relation`
    selects (see recall_target); episodes with ties are redrawn. Ids index recall_vocab(num_keys, num_values).
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if not 1 <= num_pairs <= num_keys or num_values < 1 or count < 0:
        raise ValueError(f"need 1 <= num_pairs <= num_keys, num_values >= 1 and count >= 0, got num_pairs="
                         f"{num_pairs}, num_keys={num_keys}, num_values={num_values}, count={count}")
    episodes = []
    while not episodes or sum(len(e) for e in episodes) < count:
        draw = 2 * count + 16
        keys = torch.rand(draw, num_keys, generator=generator).argsort(dim=-1)[:, :num_pairs]  # (draw, n) distinct
        values = torch.randint(num_values, (draw, num_pairs), generator=generator)  # (draw, n)
        queries = torch.randint(num_keys, (draw,), generator=generator)  # (draw,)
        target, tie = recall_target(queries, keys, relation, num_keys)
        answer = values.gather(1, target.unsqueeze(-1))  # (draw, 1)
        offset = num_keys * num_values
        tokens = torch.cat([keys * num_values + values, (offset + queries).unsqueeze(-1),
                            offset + num_keys + answer], dim=-1)  # (draw, n + 2)
        episodes.append(tokens[~tie])
    return torch.cat(episodes)[:count]


def query_blind_weights(keys, relation="ring", num_keys=32):
    """How many queries select each pair: keys (N, n) distinct ints -> (N, n) counts over the queries that do not tie.

    Queries are uniform and tied episodes are redrawn, so to a model that sees the keys but not the query, pair j
    is the target with probability counts[:, j] / counts.sum(-1).
    """
    N, n = keys.shape
    counts = torch.zeros(N, n, dtype=torch.long)
    for query in range(num_keys):
        target, tie = recall_target(torch.full((N,), query), keys, relation, num_keys)  # (N,), (N,)
        counts += torch.nn.functional.one_hot(target, n) * ~tie.unsqueeze(-1)  # (N, n)
    return counts


def recall_baseline(episodes, num_keys=32, num_values=4, relation="ring"):
    """Answer accuracy on episodes of the best guess that ignores the query (it still sees the pairs).

    The guess is the value whose pairs the most queries select (query_blind_weights): the Bayes rule given the
    pairs alone. Episodes are token ids as recall_episodes returns them, drawn with the same relation.
    """
    pairs = episodes[:, :-2]  # (N, n) ids k V + v
    weights = query_blind_weights(pairs // num_values, relation, num_keys)  # (N, n)
    votes = torch.zeros(len(episodes), num_values, dtype=weights.dtype)
    votes.scatter_add_(1, pairs % num_values, weights)  # (N, V) queries that would answer each value
    answers = episodes[:, -1] - num_keys * num_values - num_keys  # (N,)
    return (votes.argmax(dim=-1) == answers).double().mean().item()


def recall_blind_accuracy(num_pairs=6, num_keys=32, num_values=4, relation="ring", chunk=100_000):
    """Expected accuracy of recall_baseline's guess on recall_episodes' own distribution, exactly.

    Enumerates every key set S (C(num_keys, num_pairs) of them) with its query counts c_j(S) (query_blind_weights)
    and every grouping of the pairs by equal value, weighted by its probability under uniform values:
    accuracy = sum_S E_values[max_v sum_{j: v_j = v} c_j(S)] / sum_S sum_j c_j(S), since a key set is drawn, after
    redrawing ties, in proportion to its number of untied queries. The expectation over values depends on the
    counts as a multiset only, so it is taken once per distinct sorted count vector.
    """
    key_sets = torch.tensor(list(itertools.combinations(range(num_keys), num_pairs)))  # (C(K, n), n)
    counts = torch.cat([query_blind_weights(keys, relation, num_keys) for keys in key_sets.split(chunk)])
    distinct, multiplicity = counts.sort(dim=-1).values.unique(dim=0, return_counts=True)  # (D, n), (D,)
    groupings = Counter()  # pairs grouped by equal value, labels in order of first appearance -> value draws
    for labels in itertools.product(range(num_values), repeat=num_pairs):
        first = {}
        groupings[tuple(first.setdefault(label, len(first)) for label in labels)] += 1
    members = torch.nn.functional.one_hot(torch.tensor(list(groupings)), num_values).double()  # (G, n, V)
    probability = torch.tensor(list(groupings.values()), dtype=torch.double) / num_values**num_pairs  # (G,)
    best = torch.einsum("dn,gnv->dgv", distinct.double(), members).amax(dim=-1)  # (D, G) best value's queries
    return ((best @ probability) * multiplicity).sum().item() / counts.sum().item()


def recall_corpus(relation="ring", num_pairs=6, num_keys=32, num_values=4, episodes=(20_000, 2_000, 2_000),
                  seed=0):
    """The recall task as a token stream for `python -m minina train --task lm`: a TextCorpus at word level.

    Each split is its own seeded draw of recall_episodes (train seed, val seed + 1, test seed + 2), every
    episode followed by the separator "|", so the stream reads "k4:v1 k17:v3 ... q9 v3 | k2:v0 ...". A language
    model on random windows learns to predict every token; only the answer after each query is predictable (pair
    and query tokens are uniform draws), so the answer accuracy, not the stream loss, measures the task.
    """
    vocab = recall_vocab(num_keys, num_values)
    streams = []
    for offset, count in enumerate(episodes):
        tokens = recall_episodes(count, num_pairs, num_keys, num_values, relation,
                                 torch.Generator().manual_seed(seed + offset))  # (count, num_pairs + 2)
        separator = torch.full((count, 1), len(vocab) - 1, dtype=torch.long)
        streams.append(torch.cat([tokens, separator], dim=1).flatten())  # (count * (num_pairs + 3),)
    return TextCorpus(f"recall_{relation}", "word", vocab, *streams)


class AffineKeyEmbedding(nn.Module):
    """Token embedding for recall_vocab in which keys and queries enter as numbers: affine in the key value.

    Pair "k:v" -> x_k u_key + e_value[v] + b_pair, query "q" -> x_q u_query + b_query, with x = 2 k / (K - 1) - 1
    in [-1, 1]; answer tokens and the separator keep a lookup row. A TransformerLM with this as token_emb reads
    keys the way notebook 03's theorem assumes (a lookup table would let it learn any nonlinear key feature).
    """

    def __init__(self, num_keys, num_values, dim):
        super().__init__()
        self.num_keys, self.num_values = num_keys, num_values
        self.key_direction, self.query_direction = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
        self.pair_bias, self.query_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.values = nn.Embedding(num_values, dim)
        self.others = nn.Embedding(num_values + 1, dim)  # answer tokens "v" and the separator "|"
        for parameter in (self.key_direction, self.query_direction, self.values.weight, self.others.weight):
            nn.init.normal_(parameter, std=0.02)

    def forward(self, idx):
        """idx (B, T) ids of recall_vocab(num_keys, num_values) -> (B, T, dim)."""
        K, V = self.num_keys, self.num_values
        is_pair, is_query = idx < K * V, (idx >= K * V) & (idx < K * V + K)
        key = torch.where(is_pair, idx // V, idx - K * V).clamp(0, K - 1)  # (B, T) key or query value
        x = (2 * key / max(K - 1, 1) - 1).unsqueeze(-1)  # (B, T, 1) in [-1, 1]
        pair = x * self.key_direction + self.values(idx.remainder(V)) + self.pair_bias  # (B, T, dim)
        query = x * self.query_direction + self.query_bias  # (B, T, dim)
        other = self.others((idx - K * V - K).clamp(0, V))  # (B, T, dim)
        return torch.where(is_pair.unsqueeze(-1), pair, torch.where(is_query.unsqueeze(-1), query, other))
