"""The recall sequence task against brute force: episodes, targets, baseline, corpus, and the affine key embedding."""
import itertools

import pytest
import torch

import minina
from minina.tools.data import load_text
from minina.tools.recall import (AffineKeyEmbedding, RELATIONS, query_blind_weights, recall_baseline,
                                 recall_blind_accuracy, recall_corpus, recall_episodes, recall_target, recall_vocab)

K, V, N = 16, 4, 5


def decode(episode, num_keys=K, num_values=V):
    """Independent reading of one episode through the vocabulary strings: [(key, value)], query, answer."""
    words = [recall_vocab(num_keys, num_values)[i] for i in episode.tolist()]
    pairs = [tuple(int(part[1:]) for part in word.split(":")) for word in words[:-2]]
    return pairs, int(words[-2][1:]), int(words[-1][1:])


@pytest.mark.parametrize("relation", RELATIONS)
def test_episodes_match_brute_force(relation):
    episodes = recall_episodes(200, N, K, V, relation, torch.Generator().manual_seed(0))
    assert episodes.shape == (200, N + 2) and episodes.dtype == torch.long
    for episode in episodes:
        pairs, query, answer = decode(episode)
        keys = [key for key, _ in pairs]
        assert len(set(keys)) == N and all(0 <= key < K for key in keys) and 0 <= query < K
        cost = [abs(query - key) if relation == "nearest" else abs(abs(query - key) - K / 4) for key in keys]
        assert sorted(cost)[0] < sorted(cost)[1]  # no ties
        assert answer == pairs[cost.index(min(cost))][1]


def test_episodes_are_seeded_and_ties_flagged():
    draw = lambda seed: recall_episodes(50, N, K, V, "ring", torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))
    target, tie = recall_target(torch.tensor([5, 5]), torch.tensor([[3, 7, 12], [3, 8, 12]]), "nearest", K)
    assert tie.tolist() == [True, False] and target[1] == 0  # 3 and 7 tie around 5; then 3 is nearest
    target, tie = recall_target(torch.tensor([0]), torch.tensor([[4, 9, 1]]), "ring", K)  # ring radius 4
    assert not tie[0] and target[0] == 0


def brute_target(query, keys, relation, num_keys=K):
    """Plain-Python reading of the relation: the selected pair's index, or None on a tie."""
    cost = [abs(query - key) if relation == "nearest" else abs(abs(query - key) - num_keys / 4) for key in keys]
    return None if min(cost) == sorted(cost)[1] else cost.index(min(cost))


@pytest.mark.parametrize("relation", RELATIONS)
def test_baseline_is_the_value_the_most_queries_select(relation):
    episodes = recall_episodes(300, N, K, V, relation, torch.Generator().manual_seed(1))
    hits = 0
    for episode in episodes:
        pairs, _, answer = decode(episode)
        targets = [brute_target(query, [key for key, _ in pairs], relation) for query in range(K)]
        votes = [sum(t is not None and pairs[t][1] == v for t in targets) for v in range(V)]
        hits += votes.index(max(votes)) == answer
    assert recall_baseline(episodes, K, V, relation) == pytest.approx(hits / 300)
    weights = query_blind_weights(episodes[:, :N] // V, relation, K)
    assert weights.shape == (300, N) and (weights.sum(-1) <= K).all()


@pytest.mark.parametrize("relation", RELATIONS)
def test_blind_accuracy_matches_enumeration(relation):
    """Every ordered key tuple, value tuple and query of a small task, ties dropped, grouped by what the model sees."""
    num_keys, num_pairs, num_values = 10, 3, 3
    hits = total = 0
    for keys in itertools.permutations(range(num_keys), num_pairs):
        targets = [brute_target(query, keys, relation, num_keys) for query in range(num_keys)]
        for values in itertools.product(range(num_values), repeat=num_pairs):
            answers = [values[t] for t in targets if t is not None]
            hits += max(answers.count(v) for v in range(num_values))
            total += len(answers)
    assert recall_blind_accuracy(num_pairs, num_keys, num_values, relation) == pytest.approx(hits / total, abs=1e-12)


def test_blind_accuracy_matches_simulation_and_beats_the_majority_of_pairs():
    episodes = recall_episodes(20_000, N, K, V, "ring", torch.Generator().manual_seed(2))
    exact, simulated = recall_blind_accuracy(N, K, V, "ring"), recall_baseline(episodes, K, V, "ring")
    assert abs(simulated - exact) < 4 * (exact * (1 - exact) / 20_000) ** 0.5
    values, answers = episodes[:, :N] % V, episodes[:, -1] - K * V - K
    majority = torch.nn.functional.one_hot(values, V).sum(1).argmax(-1)  # (20000,) the value most pairs carry
    assert (majority == answers).double().mean().item() < simulated - 0.01
    assert 1 / V < exact < 0.8  # better than chance, far from solved


def test_corpus_is_episodes_with_separators():
    corpus = recall_corpus("nearest", N, K, V, episodes=(30, 5, 4), seed=7)
    assert corpus.vocab == recall_vocab(K, V) and corpus.level == "word"
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (30 * (N + 3), 5 * (N + 3), 4 * (N + 3))
    rows = corpus.train.view(30, N + 3)
    assert torch.equal(rows[:, :-1], recall_episodes(30, N, K, V, "nearest", torch.Generator().manual_seed(7)))
    assert corpus.decode(rows[:, -1]) == " ".join(["|"] * 30)
    assert torch.equal(corpus.val.view(5, N + 3)[:, :-1],
                       recall_episodes(5, N, K, V, "nearest", torch.Generator().manual_seed(8)))
    assert torch.equal(corpus.encode(corpus.decode(corpus.test)), corpus.test)


def test_load_text_generates_the_recall_datasets():
    for name, relation in [("recall_ring", "ring"), ("recall_nearest", "nearest")]:
        assert name in minina.tools.data.TEXT_DATASETS
        corpus = load_text(name, root="/nonexistent")  # generated: no files needed
        assert corpus.name == name and torch.equal(corpus.val, recall_corpus(relation).val)


def test_affine_key_embedding_is_affine_in_the_key():
    embedding = AffineKeyEmbedding(K, V, 8)
    pair = lambda k, v: embedding(torch.tensor([[k * V + v]]))[0, 0]  # noqa: E731
    query = lambda k: embedding(torch.tensor([[K * V + k]]))[0, 0]  # noqa: E731
    step = pair(1, 2) - pair(0, 2)
    for k in range(K):  # equal steps in the key give equal steps in the embedding
        torch.testing.assert_close(pair(k, 2) - pair(0, 2), k * step)
        torch.testing.assert_close(query(k) - query(0), k * (query(1) - query(0)))
    torch.testing.assert_close(pair(5, 3) - pair(5, 1), pair(0, 3) - pair(0, 1))  # the value adds a row
    ids = torch.arange(len(recall_vocab(K, V))).view(1, -1)
    out = embedding(ids)
    assert out.shape == (1, ids.shape[1], 8)
    torch.testing.assert_close(out[0, K * V + K:], embedding.others.weight)  # answers and separator: lookup rows


def test_recall_trains_a_transformer_from_python():
    torch.manual_seed(0)
    model = minina.TransformerLM(len(recall_vocab(K, V)), 16, 1, 2, N + 1, kind="neural")
    model.token_emb = AffineKeyEmbedding(K, V, 16)
    episodes = recall_episodes(8, N, K, V, "ring", torch.Generator().manual_seed(0))
    loss = torch.nn.functional.cross_entropy(model(episodes[:, :-1])[:, -1], episodes[:, -1])
    loss.backward()
    assert torch.isfinite(loss) and model.token_emb.key_direction.grad is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(relation="farthest"), "relation must be one of"),
    (dict(num_pairs=0), "need 1 <= num_pairs <= num_keys"),
    (dict(num_pairs=17), "need 1 <= num_pairs <= num_keys"),
    (dict(num_values=0), "num_values >= 1"),
    (dict(count=-1), "count >= 0")])
def test_episode_errors(kwargs, match):
    arguments = dict(count=4, num_pairs=N, num_keys=K, num_values=V) | kwargs
    with pytest.raises(ValueError, match=match):
        recall_episodes(**arguments)
