"""The checks of every exercise, against minina's own reference on random inputs (see checks.py for the rules).

ASSIGNMENTS maps an assignment to its notebook name (notebooks/assignments/<name>.ipynb) and title.
"""
import math
import statistics

import torch

from ..attention import dot_product_attention, neural_attention
from ..masks import attention_bias, masked_softmax as reference_masked_softmax
from ..scores import NeuralScore
from .checks import TOLERANCES, CheckFailed, NotAttempted, call, compare, compare_gradients, diagnose, exercise, random_tensor

ASSIGNMENTS = {
    "A1": ("a1_masked_attention", "Masked softmax and dot-product attention from scratch"),
    "A2": ("a2_neural_score", "The Neural Attention score: batched pair MLP, parameters, FLOPs, memory"),
    "A3": ("a3_expressivity", "Expressivity: hand-set a NeuralScore that no dot-product head can imitate"),
    "A4": ("a4_online_softmax", "The memory-efficient forward: online softmax over key blocks"),
    "A5": ("a5_tile_backward", "The backward of one tile by hand"),
    "A6": ("a6_experiment", "A small experiment done right: dot vs hybrid over seeds"),
    "A7": ("a7_triton_forward", "A Triton forward kernel, run in Triton's CPU interpreter"),
}
f32, f64 = torch.float32, torch.float64


def _name(dtype):
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------------------ A1


ATTENTION_CALLS = ("minina.dot_product_attention", "minina.neural_attention", "minina.triton_kernels",
                   "minina.MultiHeadAttention", "F.scaled_dot_product_attention", "an aten scaled_dot_product op",
                   "nn.MultiheadAttention")  # fused or ready-made attention: what no exercise may call


@exercise("A1.masked_softmax", ["masked_softmax"], forbid=("minina.masked_softmax", *ATTENTION_CALLS))
def _check_masked_softmax(masked_softmax, generator):
    for shape, dtype in (((5,), f64), ((3, 7), f32), ((2, 3, 4, 6), f64), ((2, 5, 1), f32)):
        case = f"logits of shape {shape} in {_name(dtype)}"
        x = 3 * random_tensor(shape, dtype, generator)
        _compare_weights(case, call(case, masked_softmax, x), x)
    x = random_tensor((4, 6), f32, generator) + 1000
    case = "logits around 1000 (exp overflows unless the row maximum is subtracted first)"
    _compare_weights(case, call(case, masked_softmax, x), x)
    x = random_tensor((3, 4, 8), f64, generator)
    x = x.masked_fill(torch.rand(x.shape, generator=generator) < 0.4, -math.inf)
    x[:, :, 0] = 0.5  # every row keeps one key
    case = "some logits -inf (masked keys must get weight exactly 0)"
    got = call(case, masked_softmax, x)
    if isinstance(got, torch.Tensor) and got.shape == x.shape:  # the properties first, for a clearer reason
        if (got[torch.isinf(x)] != 0).any():
            raise CheckFailed(f"{case}: a masked key got weight {got[torch.isinf(x)].abs().max().item():.3g}, "
                              f"not exactly 0")
        sums = got.double().sum(dim=-1)  # (3, 4)
        if not torch.allclose(sums, torch.ones_like(sums), rtol=0, atol=1e-10):
            raise CheckFailed(f"{case}: a row of weights sums to {sums.flatten()[(sums - 1).abs().argmax()]:.6g}, "
                              f"not 1")
    _compare_weights(case, got, x)
    x[1, 2] = -math.inf
    case = "a row whose logits are all -inf (its weights must be zeros, not NaN)"
    _compare_weights(case, call(case, masked_softmax, x), x)
    case, before = "logits of shape (2, 5)", random_tensor((2, 5), f64, generator)
    if not torch.equal(call(case, masked_softmax, before, observe={"args": True})[1]["args"][0], before):
        raise CheckFailed(f"{case}: your function changed its input in place; return a new tensor")
    compare_gradients("gradient with a row of all -inf logits (it must be zeros, not NaN), float64", masked_softmax,
                      reference_masked_softmax, [x], generator, [0])


def _compare_weights(case, got, x):
    """Compare a masked softmax of logits x with minina's, naming the usual mistake a wrong answer equals."""
    try:
        compare(case, got, reference_masked_softmax(x), "weights")
    except CheckFailed as failure:
        mistakes = {f"a softmax over dimension {d} instead of the last (the keys)":
                    reference_masked_softmax(x.transpose(d, -1)).transpose(d, -1) for d in range(x.dim() - 1)}
        mistakes["a softmax that gives a row of all -inf logits uniform weights instead of zeros"] = torch.softmax(
            x.clamp(min=torch.finfo(x.dtype).min), dim=-1)
        raise diagnose(failure, got, mistakes, TOLERANCES[x.dtype]) from None


def _attention_cases(generator):
    """(case, q, k, v, attn_mask, is_causal) covering no mask, causal, padding, float and combined masks."""
    def qkv(B, H, L, S, E, Ev, dtype):
        return (random_tensor((B, H, L, E), dtype, generator), random_tensor((B, H, S, E), dtype, generator),
                random_tensor((B, H, S, Ev), dtype, generator))
    lengths = torch.tensor([3, 7])
    padding = (torch.arange(7) < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    no_keys = torch.ones(5, 7, dtype=torch.bool)
    no_keys[2] = False  # query 2 may attend to nothing
    yield ("no mask, L = S = 5, E = 4, float64", *qkv(2, 3, 5, 5, 4, 4, f64), None, False)
    yield ("no mask, L = 4, S = 7, E = 8, Ev = 3, float32", *qkv(1, 2, 4, 7, 8, 3, f32), None, False)
    yield ("is_causal=True, L = S = 6, float64", *qkv(2, 2, 6, 6, 4, 5, f64), None, True)
    yield ("is_causal=True, L = 3, S = 5 (top-left aligned), float32", *qkv(1, 2, 3, 5, 4, 4, f32), None, True)
    yield ("boolean padding mask (B, 1, 1, S), key lengths 3 and 7, float64", *qkv(2, 2, 5, 7, 4, 4, f64),
           padding, False)
    yield ("float mask (L, S) added to the logits, float64", *qkv(2, 1, 5, 7, 4, 4, f64),
           random_tensor((5, 7), f64, generator), False)
    yield ("boolean mask with a fully masked query row (its output must be zeros), float64",
           *qkv(1, 2, 5, 7, 4, 4, f64), no_keys, False)
    yield ("padding mask combined with is_causal=True, float64", *qkv(2, 2, 7, 7, 4, 4, f64), padding, True)


def _attention_mistakes(q, k, v, mask, causal):
    """The usual wrong answers, by the words that name them."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    mistakes = {"attention without the 1/sqrt(E) scaling": dot_product_attention(q, k, v, attn_mask=mask,
                                                                                 is_causal=causal, scale=1.0),
                "attention scaled by 1/E instead of 1/sqrt(E)": dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=causal, scale=1 / E)}
    if causal:
        mistakes["attention that ignores is_causal"] = dot_product_attention(q, k, v, attn_mask=mask)
        for diagonal, words in ((0, "one key too few (the diagonal masked)"), (2, "one key too many (the next key "
                                                                                  "visible)")):
            shifted = torch.ones(L, S, dtype=torch.bool).tril(diagonal=diagonal - 1)  # (L, S)
            both = shifted if mask is None else shifted & mask
            mistakes[f"attention with the causal mask shifted by one: {words}"] = dot_product_attention(
                q, k, v, attn_mask=both)
    if mask is not None:
        mistakes["attention that ignores attn_mask"] = dot_product_attention(q, k, v, is_causal=causal)
        if mask.dtype == torch.bool:
            mistakes["attention with the boolean mask inverted (True must mean 'may attend')"] = (
                dot_product_attention(q, k, v, attn_mask=~mask, is_causal=causal))
        else:
            mistakes["attention that subtracts the float mask instead of adding it"] = dot_product_attention(
                q, k, v, attn_mask=-mask, is_causal=causal)
    return mistakes


@exercise("A1.attention", ["attention"], forbid=("minina.masked_softmax", "minina.attention_bias", *ATTENTION_CALLS))
def _check_attention(attention, generator):
    for case, q, k, v, mask, causal in _attention_cases(generator):
        got = call(case, attention, q, k, v, attn_mask=mask, is_causal=causal)
        try:
            compare(case, got, dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal), "output")
        except CheckFailed as failure:
            raise diagnose(failure, got, _attention_mistakes(q, k, v, mask, causal), TOLERANCES[q.dtype]) from None
    q, k, v = (random_tensor((1, 2, 4, 3), f64, generator) for _ in range(3))
    compare_gradients("gradient, is_causal=True, float64", attention, dot_product_attention, [q, k, v], generator,
                      [0, 1, 2], is_causal=True)


@exercise("A1.padding_mask", ["padding_mask"], forbid=ATTENTION_CALLS)
def _check_padding_mask(padding_mask, generator):
    for batch, max_len in ((3, 6), (1, 4), (5, 9)):
        lengths = torch.randint(0, max_len + 1, (batch,), generator=generator)
        lengths[0] = max_len  # a full sequence
        case = f"lengths {lengths.tolist()}, max_len {max_len}"
        positions, got = torch.arange(max_len), call(case, padding_mask, lengths, max_len)
        expected = (positions < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
        try:
            compare(case, got, expected, "mask")
        except CheckFailed as failure:
            mistakes = {"the mask inverted (True must mean a real token, one that may be attended to)": ~expected,
                        "a mask one token too long (position == length counted as a token: use <, not <=)":
                        (positions <= lengths[:, None])[:, None, None, :],
                        "a mask one token too short": (positions < lengths[:, None] - 1)[:, None, None, :]}
            raise diagnose(failure, got, mistakes, 0) from None


# ------------------------------------------------------------------------------------------------------------ A2


SCORE_CALLS = ("NeuralScore.logits", "NeuralScore.split", *ATTENTION_CALLS)


@exercise("A2.pair_logits", ["pair_logits"], forbid=SCORE_CALLS)
def _check_pair_logits(pair_logits, generator):
    for (B, H, L, S, E), options, dtype in (((2, 3, 5, 5, 16), {}, f32), ((1, 2, 4, 7, 8), {"proj_dim": 4}, f64),
                                            ((2, 1, 6, 3, 8), {"proj_dim": 3, "hidden": (5,)}, f64)):
        score = NeuralScore(E, **options).to(dtype)
        q, k = random_tensor((B, H, L, E), dtype, generator), random_tensor((B, H, S, E), dtype, generator)
        case = f"q {(B, H, L, E)}, k {(B, H, S, E)}, NeuralScore({score.extra_repr()}), {_name(dtype)}"
        got, observed = call(case, pair_logits, q, k, score, observe={"calls": 2})
        many = {name: n for name, n in observed["calls"].items() if n > 1}
        if many:
            name, n = max(many.items(), key=lambda item: item[1])
            raise CheckFailed(f"{case}: score.{name} ran {n} times; build the whole (B, H, L, S, 2P) pair tensor "
                              f"with broadcasting and apply each layer once, without Python loops")
        with torch.no_grad():
            try:
                compare(case, got, score.logits(q, k), "logits")
            except CheckFailed as failure:
                raise diagnose(failure, got, _pair_mistakes(score, q, k), TOLERANCES[dtype]) from None


def _pair_mistakes(score, q, k):
    """The usual wrong pair MLPs: the pair as (key, query), the projections swapped, the activations left out."""
    a, b = score.q_proj(q), score.k_proj(k)  # (..., L, P), (..., S, P)
    L, S = a.shape[-2], b.shape[-2]
    a, b = a.unsqueeze(-2).expand(*a.shape[:-2], L, S, -1), b.unsqueeze(-3).expand(*b.shape[:-2], L, S, -1)

    def mlp(pairs, activations=True):  # (..., L, S, 2P) -> (..., L, S)
        for layer in score.mlp:
            pairs = layer(pairs) if activations or isinstance(layer, torch.nn.Linear) else pairs
        return pairs.squeeze(-1)
    swapped_a, swapped_b = score.k_proj(q), score.q_proj(k)  # (..., L, P), (..., S, P)
    swapped = torch.cat([swapped_b.unsqueeze(-3).expand(a.shape), swapped_a.unsqueeze(-2).expand(a.shape)],
                        dim=-1)  # (..., L, S, 2P): q_proj(k_s) first
    return {"the pair MLP on (key, query) pairs instead of (query, key)": mlp(torch.cat([b, a], dim=-1)),
            "the pair MLP with the projections swapped (q_proj on the keys, k_proj on the queries)": mlp(swapped),
            "the pair MLP without its activations": mlp(torch.cat([a, b], dim=-1), activations=False)}


def _score_configs(generator):
    for _ in range(4):
        head_dim = int(torch.randint(2, 129, (), generator=generator))
        proj_dim = int(torch.randint(1, 9, (), generator=generator))
        depth = int(torch.randint(1, 4, (), generator=generator))
        yield head_dim, proj_dim, tuple(int(h) for h in torch.randint(1, 9, (depth,), generator=generator))


def _compare_number(case, got, expected, what, mistakes=None):
    """Compare a whole number; a wrong one is compared with the usual mistakes, mistakes ({words: number})."""
    if isinstance(got, bool) or not isinstance(got, (int, float)) or isinstance(got, float) and not got.is_integer():
        raise CheckFailed(f"{case}: {what} should be a whole number (int), got {got!r}")
    if int(got) != expected:
        named = [words for words, number in (mistakes or {}).items() if number == int(got)]
        raise CheckFailed(f"{case}: {what} is {int(got):,}, expected {expected:,} "
                          f"({'too many' if got > expected else 'too few'})"
                          + (f"; it equals {' or '.join(named)}" if named else ""))


@exercise("A2.score_parameters", ["score_parameters"])
def _check_score_parameters(score_parameters, generator):
    for head_dim, proj_dim, hidden in [(64, 2, (2, 1)), *_score_configs(generator)]:
        case = f"head_dim={head_dim}, proj_dim={proj_dim}, hidden={hidden}"
        score = NeuralScore(head_dim, proj_dim, hidden=hidden)
        expected = sum(p.numel() for p in score.parameters())
        mistakes = {"the count without the biases": expected - sum(
                        p.numel() for name, p in score.named_parameters() if name.endswith("bias")),
                    "the count of the MLP alone, without the query and key projections": sum(
                        p.numel() for p in score.mlp.parameters())}
        _compare_number(case, call(case, score_parameters, head_dim, proj_dim, hidden), expected, "the count",
                        mistakes)


def reference_score_flops(L, S, head_dim, proj_dim, hidden):
    """2 x the multiply-adds of the matrix products of all L x S logits built the paper's way (biases and
    activations not counted): the projections once per query and key, the MLP once per pair."""
    widths = (2 * proj_dim, *hidden, 1)
    return 2 * (L + S) * head_dim * proj_dim + 2 * L * S * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


@exercise("A2.score_flops", ["score_flops"])
def _check_score_flops(score_flops, generator):
    for head_dim, proj_dim, hidden in [(64, 2, (2, 1)), *_score_configs(generator)]:
        L, S = (int(n) for n in torch.randint(1, 2049, (2,), generator=generator))
        case = f"L={L}, S={S}, head_dim={head_dim}, proj_dim={proj_dim}, hidden={hidden}"
        expected = reference_score_flops(L, S, head_dim, proj_dim, hidden)
        projections = 2 * (L + S) * head_dim * proj_dim
        mistakes = {"the multiply-adds (each is 2 FLOPs)": expected // 2,
                    "the count without the projections": expected - projections,
                    "the count with the projections done once per pair, not once per query and key":
                    expected - projections + 2 * L * S * 2 * head_dim * proj_dim}
        _compare_number(case, call(case, score_flops, L, S, head_dim, proj_dim, hidden), expected, "the FLOP count",
                        mistakes)


@exercise("A2.pair_tensor_bytes", ["pair_tensor_bytes"])
def _check_pair_tensor_bytes(pair_tensor_bytes, generator):
    for dtype in (f32, torch.bfloat16, f64, torch.float16):
        B, H, L, S, P = (int(n) for n in torch.randint(1, 65, (5,), generator=generator))
        case = f"B={B}, H={H}, L={L}, S={S}, proj_dim={P}, dtype={dtype}"
        size = torch.empty((), dtype=dtype).element_size()
        expected = B * H * L * S * 2 * P * size
        mistakes = {"the number of elements, not bytes": expected // size,
                    "the size of one half of the pair (P features, not 2P)": expected // 2}
        _compare_number(case, call(case, pair_tensor_bytes, B, H, L, S, P, dtype), expected, "the size in bytes",
                        mistakes)


# ------------------------------------------------------------------------------------------------------------ A3


def _scalar_score(score, what):
    if not isinstance(score, NeuralScore):
        raise CheckFailed(f"{what} should be a minina.NeuralScore, got {type(score).__name__}")
    if score.head_dim != 1:
        raise CheckFailed(f"{what} should score scalar queries and keys (head_dim=1), got head_dim={score.head_dim}")


@exercise("A3.nearest_score", ["make_nearest_score"])
def _check_nearest_score(make_nearest_score, generator):
    nearest_score = call("make_nearest_score()", make_nearest_score)
    _scalar_score(nearest_score, "make_nearest_score()")
    q = random_tensor((256, 1, 1), f32, generator, -1, 1)  # (B, L=1, E=1)
    k = random_tensor((256, 8, 1), f32, generator, -1, 1)  # (B, S=8, E=1)
    with torch.no_grad():
        logits = call("256 random queries and 8 keys in [-1, 1]", nearest_score.logits, q, k)[:, 0]  # (B, S)
    distance = (q - k).abs()[..., 0]  # (B, S)
    gap = distance.sort(dim=-1).values  # ignore near-ties between the two nearest keys
    wrong = (logits.argmax(-1) != distance.argmin(-1)) & (gap[:, 1] - gap[:, 0] > 1e-3)
    if wrong.any():
        i = int(wrong.nonzero()[0])
        j, n = int(logits[i].argmax()), int(distance[i].argmin())
        raise CheckFailed(f"query {q[i, 0, 0]:.3f}: the highest score is on key {k[i, j, 0]:.3f} (distance "
                          f"{distance[i, j]:.3f}), not on the nearest key {k[i, n, 0]:.3f} (distance "
                          f"{distance[i, n]:.3f}); {int(wrong.sum())} of 256 queries are wrong")


@exercise("A3.band_score", ["make_band_score"])
def _check_band_score(make_band_score, generator):
    band_score = call("make_band_score()", make_band_score)
    _scalar_score(band_score, "make_band_score()")
    q = random_tensor((256, 1, 1), f32, generator, -1, 1)  # (B, 1, 1)
    k = random_tensor((256, 12, 1), f32, generator, -1.5, 1.5)  # (B, S, 1)
    k[:, 0] = q[:, 0] + random_tensor((256, 1), f32, generator, -0.2, 0.2)  # at least one key inside the band
    with torch.no_grad():
        weights = torch.softmax(call("256 random queries and 12 keys", band_score.logits, q, k)[:, 0], dim=-1)
    distance = (q - k).abs()[..., 0]  # (B, S)
    outside = (weights * (distance > 0.3)).sum(-1)  # weight on keys clearly outside the band
    if outside.max() > 0.01:
        i = int(outside.argmax())
        raise CheckFailed(f"query {q[i, 0, 0]:.3f}: {outside[i]:.1%} of the attention goes to keys farther than 0.3 "
                          f"(at most 1% allowed) with keys {[round(x, 2) for x in k[i, :, 0].tolist()]}")
    inside = weights * (distance < 0.2)
    share = inside.sum(-1) / (distance < 0.2).sum(-1)  # the mean weight of a key inside the band
    uneven = (inside.max(-1).values - share) / share  # (B,)
    if uneven.max() > 0.2:
        i = int(uneven.argmax())
        raise CheckFailed(f"query {q[i, 0, 0]:.3f}: keys inside the band (closer than 0.2) get unequal weights "
                          f"{[round(x, 3) for x in weights[i][distance[i] < 0.2].tolist()]}; they should share it")


# ------------------------------------------------------------------------------------------------------------ A4


def _scores_and_inputs(generator, B, H, L, S, E, dtype, spread=False, **options):
    """(score, [q, k, v]); spread=True draws the MLP weights from N(0, 2 / fan_in) with zero biases (He et al.;
    the study's init="kaiming"), for logits that vary from key to key, so a running maximum moves. A plain
    NeuralScore, so that it travels to the student's kernel by its options and weights."""
    score = NeuralScore(E, **options)
    if spread:
        for layer in score.linears():
            torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            torch.nn.init.zeros_(layer.bias)
    score = score.to(dtype)
    shapes = ((B, H, L, E), (B, H, S, E), (B, H, S, E))
    return score, [random_tensor(shape, dtype, generator) for shape in shapes]


@exercise("A4.split_first_layer", ["split_first_layer"], forbid=SCORE_CALLS)
def _check_split(split_first_layer, generator):
    for dims, options, dtype in (((2, 2, 5, 7, 16), {}, f32), ((1, 3, 4, 4, 8), {"proj_dim": 4}, f64)):
        score, (q, k, _) = _scores_and_inputs(generator, *dims, dtype, **options)
        case = f"q {tuple(q.shape)}, k {tuple(k.shape)}, NeuralScore({score.extra_repr()})"
        got = call(case, split_first_layer, q, k, score)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{case}: return the pair (A, Bk), got {type(got).__name__}")
        with torch.no_grad():
            A, Bk, _ = score.split(q, k)
            bias = score.linears()[0].bias  # (h1,) belongs to A alone
        for what, value, expected, mistakes in (("A", got[0], A, {"A without the first layer's bias": A - bias}),
                                                ("Bk", got[1], Bk, {"Bk with the first layer's bias added (it "
                                                                    "belongs to A alone)": Bk + bias})):
            try:
                compare(case, value, expected, what)
            except CheckFailed as failure:
                raise diagnose(failure, value, mistakes, TOLERANCES[dtype]) from None


def _reference_with_logsumexp(q, k, v, score, is_causal):
    logits = score.logits(q, k)  # (B, H, L, S)
    bias = attention_bias(None, is_causal, q.shape[-2], k.shape[-2], logits.dtype, logits.device)
    logits = logits if bias is None else logits + bias
    out = neural_attention(q, k, v, score, is_causal=is_causal, backend="reference")  # (B, H, L, Ev)
    return out, torch.logsumexp(logits, dim=-1)


def _compare_out_and_logsumexp(case, got, expected_out, expected_lse, single_block_ok, rescale_hint, mistakes):
    """Check an (out, logsumexp) pair; a mismatch is compared with mistakes() ({"out": {words: tensor},
    "logsumexp": ...}, the usual mistakes), and after a one-block case passed it points at the missing rescale."""
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise CheckFailed(f"{case}: return the pair (out, logsumexp), got {type(got).__name__}")
    for what, value, expected in (("out", got[0], expected_out), ("logsumexp", got[1], expected_lse)):
        try:
            compare(case, value, expected, what)
        except CheckFailed as failure:
            failure = diagnose(failure, value, mistakes()[what], TOLERANCES[expected.dtype])
            if single_block_ok:
                raise CheckFailed(f"{failure}. It matched with one key block: when the running maximum changes, "
                                  f"{rescale_hint}") from None
            raise failure from None


def online_mistakes(logits_of, v, block_size):
    """The usual wrong online softmaxes over key blocks of block_size keys, for out and logsumexp.

    logits_of(start, stop): the (masked) logits of keys start..stop-1, (..., L, n); v: (..., S, Ev).
    """
    def run(rescale_sum, rescale_acc):
        m = l = acc = None
        for start in range(0, v.shape[-2], block_size):
            s = logits_of(start, min(start + block_size, v.shape[-2]))  # (..., L, n)
            if m is None:
                m = torch.full(s.shape[:-1], -math.inf, dtype=s.dtype)  # (..., L)
                l, acc = torch.zeros_like(m), torch.zeros(*s.shape[:-1], v.shape[-1], dtype=s.dtype)
            new = torch.maximum(m, s.amax(dim=-1))
            safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))  # a fully masked block so far
            alpha, p = torch.exp(m - safe), torch.exp(s - safe[..., None])  # (..., L), (..., L, n)
            l = (l * alpha if rescale_sum else l) + p.sum(dim=-1)
            acc = (acc * alpha[..., None] if rescale_acc else acc) + p @ v[..., start:start + s.shape[-1], :]
            m = new
        return acc, l, m

    with torch.no_grad():
        (acc, l, m), (_, l_fixed, _), (acc_fixed, _, _), (acc_none, l_none, _) = (
            run(True, True), run(False, True), run(True, False), run(False, False))
        divide = torch.where(l > 0, l, torch.ones_like(l))[..., None]  # (..., L, 1)
    return {"out": {"online softmax without rescaling the accumulator by exp(m_old - m_new)": acc_fixed / divide,
                    "online softmax without rescaling the running sum by exp(m_old - m_new)": acc / l_fixed[..., None],
                    "online softmax rescaling neither the running sum nor the accumulator":
                    acc_none / l_none[..., None],
                    "the accumulator not divided by the running sum at the end": acc},
            "logsumexp": {"the running maximum m without log(l) added": m,
                          "log(l) without the running maximum m added": torch.log(l),
                          "logsumexp with the running sum not rescaled by exp(m_old - m_new)": m + torch.log(l_fixed)}}


PADDING = 1e6  # a key whose first feature is PADDING is padding for LeadingPaddingScore


class LeadingPaddingScore(NeuralScore):
    """A NeuralScore that scores padding keys (first feature PADDING) -inf: a row whose first key block is all
    padding keeps the running maximum at -inf, the case the online softmax must guard."""

    def logits(self, q, k):
        padded = k[..., 0] >= PADDING  # (..., S)
        return super().logits(q, k).masked_fill(padded[..., None, :], -math.inf)  # (..., L, S)


def _online_cases(generator):
    """(score, q, k, v, is_causal, words) for A4.online_attention."""
    options = dict(proj_dim=4, hidden=(8,))
    for dims, dtype, causal in (((1, 2, 6, 10, 8), f64, False), ((2, 1, 5, 9, 8), f32, False),
                                ((1, 2, 8, 8, 8), f64, True)):
        yield (*_scores_and_inputs(generator, *dims, dtype, spread=True, **options), causal, "")
    score, (q, k, v) = _scores_and_inputs(generator, 1, 2, 5, 9, 8, f64, spread=True, **options)
    k[..., :4, 0] = PADDING
    padded = LeadingPaddingScore(8, **options).to(f64)
    padded.load_state_dict(score.state_dict())
    yield padded, (q, k, v), False, ", the first 4 keys score -inf (every query's first blocks are fully masked)"


@exercise("A4.online_attention", ["online_attention"], forbid=("minina.masked_softmax", *ATTENTION_CALLS))
def _check_online_attention(online_attention, generator):
    for score, (q, k, v), causal, words in _online_cases(generator):
        with torch.no_grad():
            expected_out, expected_lse = _reference_with_logsumexp(q, k, v, score, causal)
        S, single_block_ok = k.shape[-2], False
        for block_size in (S, 1, 3, 4):
            blocks = -(-S // block_size)
            case = (f"q {tuple(q.shape)}, k {tuple(k.shape)}, {_name(q.dtype)}, is_causal={causal}, block_size "
                    f"{block_size} ({blocks} key block{'s' if blocks > 1 else ''}){words}")
            got, observed = call(case, online_attention, q, k, v, score, block_size, is_causal=causal,
                                 observe={"widths": True})
            if observed["widths"] and max(observed["widths"]) > block_size:
                raise CheckFailed(f"{case}: the score was applied to {max(observed['widths'])} keys at once; score "
                                  f"one key block of at most block_size keys at a time")
            _compare_out_and_logsumexp(case, got, expected_out, expected_lse, single_block_ok and not words,
                                       "rescale the running sum and the accumulator by exp(m_old - m_new)",
                                       lambda: online_mistakes(_score_blocks(score, q, k, causal), v, block_size))
            single_block_ok = True


def _score_blocks(score, q, k, is_causal):
    """logits_of(start, stop) for online_mistakes: the score's logits of keys start..stop-1, causally masked."""
    def logits_of(start, stop):
        logits = score.logits(q, k[..., start:stop, :])  # (..., L, n)
        if not is_causal:
            return logits
        return logits.masked_fill(torch.arange(start, stop) > torch.arange(q.shape[-2])[:, None], -math.inf)
    return logits_of


# ------------------------------------------------------------------------------------------------------------ A5


def tile_logits(A, Bk, W2, b2, W3, b3):
    """Scores of one tile, the rest of a ReLU score MLP after the split first layer: (bl, h1), (bs, h1) -> (bl, bs)."""
    hidden = torch.relu(A[:, None, :] + Bk[None, :, :])  # (bl, bs, h1)
    hidden = torch.relu(hidden @ W2.T + b2)  # (bl, bs, h2)
    return (hidden @ W3.T + b3)[..., 0]  # (bl, bs)


def _tile(generator, bl, bs, h1, h2, Ev, dtype):
    names = ("A", "Bk", "W2", "b2", "W3", "b3", "v", "grad_out")
    shapes = ((bl, h1), (bs, h1), (h2, h1), (h2,), (1, h2), (1,), (bs, Ev), (bl, Ev))
    return {name: random_tensor(shape, dtype, generator) for name, shape in zip(names, shapes)}


TILE_SHAPES = ((4, 4, 2, 1, 4, f64), (3, 5, 4, 2, 2, f64), (5, 3, 3, 2, 6, f32))


def _tile_case(bl, bs, h1, h2, Ev, dtype):
    return f"tile bl={bl}, bs={bs}, h1={h1}, h2={h2}, Ev={Ev}, {_name(dtype)}"


BACKWARD_CALLS = ("autograd (backward or torch.autograd.grad)", *ATTENTION_CALLS)  # "by hand" means by hand


@exercise("A5.softmax_backward", ["softmax_backward"], forbid=BACKWARD_CALLS)
def _check_softmax_backward(softmax_backward, generator):
    for shape in TILE_SHAPES:
        t, case = _tile(generator, *shape), _tile_case(*shape)
        logits = tile_logits(t["A"], t["Bk"], t["W2"], t["b2"], t["W3"], t["b3"]).requires_grad_()
        v = t["v"].requires_grad_()
        p = torch.softmax(logits, dim=-1)  # (bl, bs)
        (p @ v).backward(t["grad_out"])
        got = call(case, softmax_backward, p.detach(), t["v"].detach(), t["grad_out"])
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{case}: return the pair (grad_v, grad_logits), got {type(got).__name__}")
        p, grad_p = p.detach(), t["grad_out"] @ t["v"].T  # (bl, bs): the gradient of the weights
        mistakes = ({"P dO, not P^T dO": p @ t["grad_out"]} if p.shape[0] == p.shape[1] else {},
                    {"P * (dO V^T), without subtracting the row sums of P * (dO V^T)": p * grad_p,
                     "dO V^T, the gradient of the weights, without the softmax's backward": grad_p,
                     "the softmax's backward with the sums over the queries, not the keys":
                     p * (grad_p - (p * grad_p).sum(dim=0, keepdim=True))})
        for value, expected, what, wrong in zip(got, (v.grad, logits.grad), ("grad_v", "grad_logits"), mistakes):
            try:
                compare(case, value, expected, what)
            except CheckFailed as failure:
                raise diagnose(failure, value, wrong, TOLERANCES[expected.dtype]) from None


@exercise("A5.mlp_backward", ["mlp_backward"], forbid=BACKWARD_CALLS)
def _check_mlp_backward(mlp_backward, generator):
    names = ("A", "Bk", "W2", "b2", "W3", "b3")
    for shape in TILE_SHAPES:
        t, case = _tile(generator, *shape), _tile_case(*shape)
        params = {name: t[name].clone().requires_grad_() for name in names}
        grad_logits = random_tensor(shape[:2], shape[-1], generator)  # (bl, bs)
        tile_logits(*params.values()).backward(grad_logits)
        got = call(case, mlp_backward, *(t[name] for name in names), grad_logits)
        if not isinstance(got, dict) or set(got) != set(names):
            raise CheckFailed(f"{case}: return a dict with the keys {list(names)}, got "
                              f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
        mistakes = _mlp_mistakes(t, grad_logits)
        for name in names:
            try:
                compare(case, got[name], params[name].grad, f"the gradient of {name}")
            except CheckFailed as failure:
                raise diagnose(failure, got[name], mistakes[name], TOLERANCES[grad_logits.dtype]) from None


def _mlp_mistakes(t, grad_logits):
    """name -> {words: tensor}: the usual wrong gradients of the tile's score MLP (a ReLU's derivative left out,
    dA and dBk summed over the wrong axis)."""
    names = ("A", "Bk", "W2", "b2", "W3", "b3")

    def relu(x, through):  # through: the backward passes every gradient (the ReLU's mask left out)
        return x + (torch.relu(x) - x).detach() if through else torch.relu(x)

    def gradients(through1, through2):
        params = [t[name].clone().requires_grad_() for name in names]
        A, Bk, W2, b2, W3, b3 = params
        pre1 = A[:, None, :] + Bk[None, :, :]  # (bl, bs, h1)
        logits = (relu(relu(pre1, through1) @ W2.T + b2, through2) @ W3.T + b3)[..., 0]  # (bl, bs)
        grads = torch.autograd.grad(logits, [*params, pre1], grad_logits)
        return dict(zip(names, grads)), grads[-1]

    (first, _), (second, _), (_, grad_pre1) = gradients(True, False), gradients(False, True), gradients(False, False)
    mistakes = {name: {"the gradient without the first ReLU's derivative (mask it with pre-activation > 0)":
                       first[name], "the gradient without the second ReLU's derivative (mask it with "
                                    "pre-activation > 0)": second[name]} for name in names}
    mistakes["A"]["dA summed over the queries instead of the keys"] = grad_pre1.sum(dim=0)  # (bs, h1)
    mistakes["Bk"]["dBk summed over the keys instead of the queries"] = grad_pre1.sum(dim=1)  # (bl, h1)
    return mistakes


# ------------------------------------------------------------------------------------------------------------ A6


def _as_number(case, value, what):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise CheckFailed(f"{case}: {what} should be a number, got {type(value).__name__}") from None
    if not math.isfinite(number):
        raise CheckFailed(f"{case}: {what} is {number}, not a finite number")
    return number


@exercise("A6.train_one", ["train_one"])
def _check_train_one(train_one, generator):
    seed, other = (int(s) for s in torch.randperm(100, generator=generator)[:2])
    first = _as_number(f"train_one('dot', {seed}, steps=20)", call(f"train_one('dot', {seed}, steps=20)", train_one,
                                                                   "dot", seed, steps=20), "the validation loss")
    again = _as_number("the same call again", call("the same call again", train_one, "dot", seed, steps=20), "loss")
    if abs(first - again) > 1e-6 * abs(first):
        raise CheckFailed(f"train_one('dot', {seed}, steps=20) gave {first:.6f}, then {again:.6f}: seed the model's "
                          f"initialisation and the batch sampling from `seed` so that a run can be repeated")
    other_loss = _as_number(f"train_one('dot', {other}, steps=20)", call(
        f"train_one('dot', {other}, steps=20)", train_one, "dot", other, steps=20), "loss")
    if other_loss == first:
        raise CheckFailed(f"seeds {seed} and {other} gave the same loss {first:.6f}: the seed must change the run")
    hybrid = _as_number(f"train_one('hybrid', {seed}, steps=20)", call(
        f"train_one('hybrid', {seed}, steps=20)", train_one, "hybrid", seed, steps=20), "loss")
    if hybrid == first:
        raise CheckFailed(f"'dot' and 'hybrid' gave the same loss {first:.6f} for seed {seed}: pass `kind` to the "
                          f"model")
    uniform = math.log(65)
    if max(first, hybrid) >= uniform:
        raise CheckFailed(f"after 20 steps the validation loss is {max(first, hybrid):.3f}, no better than guessing "
                          f"uniformly over 65 characters ({uniform:.3f}): is the optimizer stepping?")


def reference_mean_std(values):
    return statistics.mean(values), statistics.stdev(values)


@exercise("A6.mean_std", ["mean_std"])
def _check_mean_std(mean_std, generator):
    for n in (2, 3, 5, 8):
        values = (2 + 0.3 * torch.randn(n, generator=generator, dtype=f64)).tolist()
        case = f"values {[round(x, 4) for x in values]}"
        got = call(case, mean_std, list(values))
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"{case}: return the pair (mean, std), got {type(got).__name__}")
        mean, std = (_as_number(case, x, what) for x, what in zip(got, ("mean", "std")))
        expected_mean, expected_std = reference_mean_std(values)
        if abs(mean - expected_mean) > 1e-10 * (1 + abs(expected_mean)):
            raise CheckFailed(f"{case}: mean {mean:.6f}, expected {expected_mean:.6f}")
        if abs(std - expected_std) > 1e-10 * (1 + expected_std):
            population = statistics.pstdev(values)
            why = (" (that is the population std, dividing by n; the sample std divides by n - 1)"
                   if abs(std - population) < 1e-10 * (1 + population) else "")
            raise CheckFailed(f"{case}: std {std:.6f}, expected {expected_std:.6f}{why}")


CONCLUSIONS = ("dot is better", "hybrid is better", "no clear difference")


def supported_conclusion(summary, counts):
    """The conclusion the numbers support: a difference of means beyond 2 standard errors, else none."""
    (mean_dot, std_dot), (mean_hybrid, std_hybrid) = summary["dot"], summary["hybrid"]
    standard_error = math.sqrt(std_dot ** 2 / counts["dot"] + std_hybrid ** 2 / counts["hybrid"])
    if abs(mean_dot - mean_hybrid) <= 2 * standard_error:
        return "no clear difference"
    return "dot is better" if mean_dot < mean_hybrid else "hybrid is better"  # lower validation loss is better


def _rule(summary, counts, errors=2, standard_error=True, lower_is_better=True):
    """supported_conclusion with the usual mistakes switchable: another number of standard errors, the standard
    deviations in place of the standard error, higher loss taken as better; errors=0: the means alone."""
    (mean_dot, std_dot), (mean_hybrid, std_hybrid) = summary["dot"], summary["hybrid"]
    n_dot, n_hybrid = (counts["dot"], counts["hybrid"]) if standard_error else (1, 1)
    if abs(mean_dot - mean_hybrid) <= errors * math.sqrt(std_dot ** 2 / n_dot + std_hybrid ** 2 / n_hybrid):
        return "no clear difference"
    return "dot is better" if (mean_dot < mean_hybrid) == lower_is_better else "hybrid is better"


WRONG_RULES = {"the means alone, without the standard errors": lambda s, c: _rule(s, c, errors=0),
               "one standard error instead of two": lambda s, c: _rule(s, c, errors=1),
               "the standard deviations instead of the standard error of the difference (not divided by the number "
               "of seeds)": lambda s, c: _rule(s, c, standard_error=False),
               "the rule with higher loss taken as better (lower validation loss is better)":
               lambda s, c: _rule(s, c, lower_is_better=False)}


@exercise("A6.conclude", ["conclude"])
def _check_conclude(conclude, generator):
    situations = [(2.50, 0.02, 2.40, 0.02, 3), (2.40, 0.02, 2.50, 0.03, 3), (2.50, 0.10, 2.45, 0.10, 3),
                  (2.50, 0.05, 2.44, 0.05, 5), (2.50, 0.05, 2.44, 0.05, 2)]
    for _ in range(3):
        m = (2 + torch.rand(2, generator=generator, dtype=f64)).tolist()
        s = (0.1 * torch.rand(2, generator=generator, dtype=f64)).tolist()
        situations.append((m[0], s[0], m[1], s[1], 3))
    answers = []  # (summary, counts, the student's conclusion) so far
    for mean_dot, std_dot, mean_hybrid, std_hybrid, n in situations:
        summary = {"dot": (mean_dot, std_dot), "hybrid": (mean_hybrid, std_hybrid)}
        counts = {"dot": n, "hybrid": n}
        case = (f"dot {mean_dot:.3f} ± {std_dot:.3f}, hybrid {mean_hybrid:.3f} ± {std_hybrid:.3f}, {n} seeds each")
        got = call(case, conclude, summary, counts)
        if got not in CONCLUSIONS:
            raise CheckFailed(f"{case}: the conclusion must be one of {CONCLUSIONS}, got {got!r}")
        answers.append((summary, counts, got))
        if got != supported_conclusion(summary, counts):
            named = [words for words, rule in WRONG_RULES.items() if all(rule(*a[:2]) == a[2] for a in answers)]
            raise CheckFailed(f"{case}: {got!r} is not what these numbers support under the rule (a difference of "
                              f"means beyond 2 standard errors of the difference, lower loss is better)"
                              + (f"; your answers so far follow {named[0]}" if named else ""))


@exercise("A6.report", ["results", "summary", "conclusion", "train_one"], points=2)
def _check_report(results, summary, conclusion, train_one, generator):
    results, summary, conclusion = results.value(), summary.value(), conclusion.value()
    if results is None or summary is None or conclusion is None:
        raise NotAttempted("A6.report")
    if not isinstance(results, dict) or set(results) != {"dot", "hybrid"}:
        raise CheckFailed(f"results should be a dict with the keys 'dot' and 'hybrid', got {results!r:.80}")
    for kind, per_seed in results.items():
        if not isinstance(per_seed, dict) or len(per_seed) < 3:
            raise CheckFailed(f"results[{kind!r}] should map at least 3 seeds to a validation loss, "
                              f"got {per_seed!r:.80}")
        values = [_as_number(f"results[{kind!r}]", x, "a loss") for x in per_seed.values()]
        if not isinstance(summary, dict) or kind not in summary:
            raise CheckFailed(f"summary should be a dict with the key {kind!r}")
        reported = [_as_number(f"summary[{kind!r}]", x, "mean and std") for x in summary[kind]]
        for got, expected, what in zip(reported, reference_mean_std(values), ("mean", "std")):
            if abs(got - expected) > 1e-9 * (1 + abs(expected)):
                raise CheckFailed(f"summary[{kind!r}] reports {what} {got:.6f}, but the per-seed values give "
                                  f"{expected:.6f}")
    counts = {kind: len(per_seed) for kind, per_seed in results.items()}
    if conclusion not in CONCLUSIONS:
        raise CheckFailed(f"conclusion must be one of {CONCLUSIONS}, got {conclusion!r}")
    if conclusion != supported_conclusion(summary, counts):
        raise CheckFailed(f"the conclusion {conclusion!r} is not what your numbers support under the rule of the "
                          f"notebook (a difference of means beyond 2 standard errors)")
    kind = ("dot", "hybrid")[int(torch.randint(2, (), generator=generator))]
    seeds = sorted(results[kind])
    seed = seeds[int(torch.randint(len(seeds), (), generator=generator))]
    case = f"re-running train_one({kind!r}, {seed})"
    again = _as_number(case, call(case, train_one, kind, seed), "the loss")
    reported = float(results[kind][seed])
    if abs(again - reported) > 1e-4 * abs(reported):
        raise CheckFailed(f"{case} gave {again:.6f}, but results report {reported:.6f}: the reported numbers must "
                          f"come from the code as it is now")


# ------------------------------------------------------------------------------------------------------------ A7


@exercise("A7.triton_attention", ["triton_attention"], forbid=ATTENTION_CALLS)
def _check_triton_attention(triton_attention, generator):
    B, H, L, S, E = 1, 2, 37, 45, 16  # lengths that are not multiples of the blocks: the edges need masks
    q, k, v = (random_tensor((B, H, n, E), f32, generator) for n in (L, S, S))
    expected_out = dot_product_attention(q, k, v)
    expected_lse = torch.logsumexp(q @ k.transpose(-2, -1) / math.sqrt(E), dim=-1)  # (B, H, L)
    single_block_ok = False
    for block_n in (64, 16, 32):
        blocks = -(-S // block_n)
        case = f"q {(B, H, L, E)}, k {(B, H, S, E)}, float32, BLOCK_N {block_n} ({blocks} key block" + (
            "s)" if blocks > 1 else ")")
        got = call(case, triton_attention, q, k, v, block_n)
        _compare_out_and_logsumexp(case, got, expected_out, expected_lse, single_block_ok,
                                   "rescale l_i and acc by exp(m_i - m_new)",
                                   lambda: _kernel_mistakes(q, k, v, block_n))
        single_block_ok = True


def _kernel_mistakes(q, k, v, block_n):
    """The usual wrong Triton forwards: the online softmax's, no scale, and the last block's padding keys kept."""
    scale = 1 / math.sqrt(q.shape[-1])
    mistakes = online_mistakes(lambda start, stop: q @ k[..., start:stop, :].transpose(-2, -1) * scale, v, block_n)
    pad = -(-k.shape[-2] // block_n) * block_n - k.shape[-2]  # the keys past the end in the last block
    padded_k, padded_v = (torch.cat([t, torch.zeros(*t.shape[:-2], pad, t.shape[-1])], dim=-2) for t in (k, v))
    for words, (k_, v_, scale_) in (("attention without the 1/sqrt(E) scaling", (k, v, 1.0)),
                                    ("attention that lets the keys past the end (loaded as 0) into the softmax: mask "
                                     "them with -inf", (padded_k, padded_v, scale))):
        mistakes["out"][words] = dot_product_attention(q, k_, v_, scale=scale_)
        mistakes["logsumexp"][words] = torch.logsumexp(q @ k_.transpose(-2, -1) * scale_, dim=-1)
    return mistakes
