"""MultiHeadAttention, the blocks and both models: shapes, causality, hybrid placement, errors, backward."""
import inspect
import pathlib
import re

import pytest
import torch

from minina import Block, MultiHeadAttention, NeuralScore, TransformerLM, VisionTransformer, dot_product_attention


@pytest.mark.parametrize("kind", ["dot", "neural"])
def test_mha_matches_manual_heads(kind):
    mha = MultiHeadAttention(16, heads=2, kind=kind)
    x = torch.randn(3, 5, 16)
    q = mha.to_q(x).view(3, 5, 2, 8).transpose(1, 2)
    k, v = mha.to_kv(x).chunk(2, dim=-1)
    k, v = (t.view(3, 5, 2, 8).transpose(1, 2) for t in (k, v))
    weights = mha.attention_weights(x)  # (3, 2, 5, 5)
    expected = mha.to_out((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(mha(x), expected)
    if kind == "dot":
        torch.testing.assert_close(weights @ v, dot_product_attention(q, k, v))
    else:
        assert isinstance(mha.score, NeuralScore) and mha.kind == "neural"


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_mha_dot_runs_sdpa_equal_to_the_written_out_reference(is_causal, masked):
    """kind="dot" calls F.scaled_dot_product_attention; backend="reference" the written-out dot_product_attention.
    Same weights, float64: equal outputs and gradients, also for cross-attention and rows a mask leaves empty."""
    torch.manual_seed(1)
    fast = MultiHeadAttention(16, heads=2, kind="dot", is_causal=is_causal).double()
    reference = MultiHeadAttention(16, heads=2, kind="dot", is_causal=is_causal, backend="reference").double()
    reference.load_state_dict(fast.state_dict())
    x, context = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 6, 16, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(3, 1, 5, 6) > 0.3
        mask[:, :, 2] = False  # query 2 has no key: zeros
    for ctx in (None, context):
        ctx_mask = None if mask is None else mask[..., :5] if ctx is None else mask  # (3, 1, 5, S)
        outputs = [m(x, ctx, attn_mask=ctx_mask) for m in (fast, reference)]
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad(out.square().sum(), m.parameters()) for out, m in zip(outputs, (fast, reference))]
        for fast_grad, reference_grad in zip(*grads):
            torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dot", "hybrid"])
def test_models_equal_their_written_out_reference(kind):
    """The models' dot-product blocks on SDPA give the outputs of the written-out path, to float64 rounding."""
    def build(backend):
        torch.manual_seed(2)
        lm = TransformerLM(13, 64, depth=2, heads=2, max_seq_len=9, kind=kind, backend=backend)
        vit = VisionTransformer(8, 4, 5, 64, depth=2, heads=2, channels=1, kind=kind, backend=backend)
        return lm.double(), vit.double()
    (lm, vit), (lm_ref, vit_ref) = build("auto"), build("reference")
    idx, images = torch.randint(0, 13, (3, 9)), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(lm(idx), lm_ref(idx), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vit(images), vit_ref(images), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dot", "neural"])
def test_cross_attention_and_mask(kind):
    mha = MultiHeadAttention(12, heads=3, kind=kind, head_dim=5)
    x, context = torch.randn(2, 4, 12), torch.randn(2, 7, 12)
    mask = torch.ones(2, 1, 4, 7, dtype=torch.bool)
    mask[..., 5:] = False  # padding: the last two context tokens do not exist
    out = mha(x, context, attn_mask=mask)
    changed = context.clone()
    changed[:, 5:] = torch.randn(2, 2, 12)
    assert out.shape == (2, 4, 12)
    torch.testing.assert_close(mha(x, changed, attn_mask=mask), out)


@pytest.mark.parametrize("kind", ["dot", "neural", "hybrid"])
def test_lm_never_looks_ahead(kind):
    model = TransformerLM(vocab_size=11, dim=16, depth=2, heads=2, max_seq_len=12, kind=kind).eval()
    idx = torch.randint(0, 11, (2, 10))
    future = idx.clone()
    future[:, 6:] = torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(model(idx)[:, :6], model(future)[:, :6])
    assert not torch.allclose(model(idx)[:, 6:], model(future)[:, 6:])


def test_hybrid_places_neural_in_first_block_only():
    lm = TransformerLM(11, 16, depth=3, heads=2, max_seq_len=8, kind="hybrid")
    assert [b.attn.kind for b in lm.blocks] == ["neural", "dot", "dot"]
    assert [hasattr(b.attn, "score") for b in lm.blocks] == [True, False, False]
    vit = VisionTransformer(8, 4, 3, 16, depth=2, heads=2, kind=["dot", "neural"])
    assert [b.attn.kind for b in vit.blocks] == ["dot", "neural"]


@pytest.mark.parametrize("kind", ["dot", "neural", "hybrid"])
def test_models_forward_backward(kind):
    lm = TransformerLM(13, 16, depth=2, heads=2, max_seq_len=9, kind=kind)
    idx = torch.randint(0, 13, (3, 9))
    assert lm(idx).shape == (3, 9, 13)
    lm.loss(idx[:, :-1], idx[:, 1:]).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())
    vit = VisionTransformer(8, 4, 5, 16, depth=2, heads=2, channels=1, kind=kind)
    logits = vit(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in vit.parameters())


def test_generate_extends_and_respects_window():
    lm = TransformerLM(7, 16, depth=1, heads=2, max_seq_len=4, kind="neural")
    out = lm.generate(torch.zeros(2, 1, dtype=torch.long), 6, top_k=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 7) and out.max() < 7
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(out, 1, temperature=0)


@pytest.mark.parametrize("call, match", [
    (lambda m: m.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=0), "top_k must be None or an int >= 1, got 0"),
    (lambda m: m.generate(torch.zeros(2, 0, dtype=torch.long), 2), r"prompt of shape \(B, T\) with T >= 1.*\(2, 0\)"),
    (lambda m: m.generate(torch.zeros(1, 1, dtype=torch.long), -1), "max_new_tokens must be an int >= 0"),
    (lambda m: m(torch.tensor([[1, 7, 2]])), r"token ids in \[0, vocab_size=7\), got values in \[1, 7\]"),
    (lambda m: m(torch.tensor([[-1, 3]])), r"token ids in \[0, vocab_size=7\), got values in \[-1, 3\]"),
    (lambda m: m.generate(torch.tensor([[9]]), 1), r"vocab_size=7"),
    (lambda m: m.loss(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[0, 7, 1]])), r"targets must hold.*\[0, 7\]"),
    (lambda m: m.loss(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)),
     r"targets must have the shape of idx \(1, 3\), got \(1, 2\)"),
])
def test_lm_bad_ids_and_generate_arguments(call, match):
    """Errors that name the argument instead of an IndexError (or, on CUDA, a device-side assert)."""
    with pytest.raises(ValueError, match=match):
        call(TransformerLM(7, 16, depth=1, heads=2, max_seq_len=4))


def test_check_ids_false_skips_only_the_range_check():
    lm = TransformerLM(7, 16, depth=1, heads=2, max_seq_len=4).eval()
    idx = torch.randint(0, 7, (2, 4))
    torch.testing.assert_close(lm(idx, check_ids=False), lm(idx))
    with pytest.raises(IndexError):
        lm(torch.tensor([[7]]), check_ids=False)


@pytest.mark.parametrize("build, call, match", [
    (lambda: TransformerLM(7, 16, 1, 2, 4), lambda m: m(torch.zeros(1, 5, dtype=torch.long)),
     r"sequence length 5 exceeds max_seq_len 4 \(idx \(1, 5\)\)"),
    (lambda: TransformerLM(7, 16, 1, 2, 4), lambda m: m(torch.zeros(1, 2)), r"integer tensor of shape \(B, T\)"),
    (lambda: VisionTransformer(8, 4, 3, 16, 1, 2), lambda m: m(torch.zeros(1, 3, 16, 16)),
     r"images must have shape \(B, 3, 8, 8\), got \(1, 3, 16, 16\)"),
    (lambda: MultiHeadAttention(16, 2), lambda m: m(torch.zeros(2, 3, 8)), r"\(B, L, 16\), got \(2, 3, 8\)"),
    (lambda: MultiHeadAttention(16, 2), lambda m: m(torch.zeros(2, 3, 16), torch.zeros(1, 3, 16)),
     r"context must have shape \(2, S, 16\), got \(1, 3, 16\)"),
])
def test_model_bad_inputs(build, call, match):
    with pytest.raises(ValueError, match=match):
        call(build())


@pytest.mark.parametrize("build, match", [
    (lambda: MultiHeadAttention(16, 2, kind="linear"), "kind must be one of"),
    (lambda: MultiHeadAttention(16, 2, backend="fast"), "backend must be one of"),
    (lambda: MultiHeadAttention(15, 2), r"dim \(15\) must be divisible by heads \(2\)"),
    (lambda: MultiHeadAttention(16, 2, proj_dim=4), "kind='neural' only"),
    (lambda: TransformerLM(7, 16, 2, 2, 4, kind="sparse"), "kind must be one of"),
    (lambda: TransformerLM(7, 16, 2, 2, 4, kind=["dot"]), "needs 2 entries"),
    (lambda: VisionTransformer(10, 4, 3, 16, 1, 2), r"image_size \(10\) must be divisible by patch_size \(4\)"),
])
def test_bad_constructor_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_score_options_reach_neural_blocks_only():
    lm = TransformerLM(11, 64, depth=2, heads=2, max_seq_len=8, kind="hybrid", proj_dim=4,
                       score_options={"hidden": (6, 3)})
    score = lm.blocks[0].attn.score
    assert (score.proj_dim, score.hidden) == (4, (6, 3)) and not hasattr(lm.blocks[1].attn, "score")
    vit = VisionTransformer(8, 4, 3, 64, depth=2, heads=2, kind=["dot", "neural"], proj_dim=8)
    assert vit.blocks[1].attn.score.proj_dim == 8


def test_dot_blocks_ignore_the_neural_only_options():
    """A model hands the same options to every block; a dot block builds no score and keeps no proj_dim."""
    block = Block(16, 2, kind="dot", proj_dim=4, score_options={"hidden": "wide"})
    assert block.attn.kind == "dot" and not hasattr(block.attn, "score")
    neural = Block(16, 2, kind="neural", is_causal=True, proj_dim=4, score_options={"activation": "gelu"})
    assert (neural.attn.score.proj_dim, neural.attn.score.activation, neural.attn.is_causal) == (4, "gelu", True)
    assert Block(12, 3, head_dim=5).attn.head_dim == 5


def test_models_take_head_dim():
    lm = TransformerLM(11, 12, depth=2, heads=3, max_seq_len=8, kind="hybrid", head_dim=5)
    assert [block.attn.head_dim for block in lm.blocks] == [5, 5] and lm.blocks[0].attn.score.head_dim == 5
    assert lm(torch.randint(0, 11, (2, 8))).shape == (2, 8, 11)
    vit = VisionTransformer(8, 4, 3, 12, depth=1, heads=3, kind="neural", head_dim=5)
    assert vit.blocks[0].attn.head_dim == 5 and vit(torch.randn(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("cls", [TransformerLM, VisionTransformer, Block, MultiHeadAttention])
def test_signatures_name_every_option(cls):
    """help() shows the options: no **kwargs bag in the way."""
    parameters = inspect.signature(cls).parameters
    assert {"kind", "head_dim", "proj_dim", "backend", "score_options"} <= set(parameters)
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())


@pytest.mark.parametrize("build", [
    lambda: MultiHeadAttention(16, 2, kind="neural", score_options="gelu"),
    lambda: Block(16, 2, kind="dot", score_options=["wide"]),  # ignored by a dot block, but still the wrong type
    lambda: TransformerLM(7, 16, 2, 2, 4, kind="hybrid", score_options="gelu"),
    lambda: VisionTransformer(8, 4, 3, 16, 1, 2, score_options=("hidden", "wide")),
])
def test_score_options_must_be_a_dict(build):
    with pytest.raises(TypeError, match="score_options must be a dict of NeuralScore keyword arguments or None, got"):
        build()


@pytest.mark.parametrize("build", [
    lambda: TransformerLM(7, 16, 2, 2, 4, kind="neural", proj_dimm=4),
    lambda: VisionTransformer(8, 4, 3, 16, 1, 2, attention="neural"),  # the name before kind
    lambda: Block(16, 2, causal=True),  # the name before is_causal
])
def test_a_misspelt_option_fails_where_it_is_typed(build):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        build()


@pytest.mark.parametrize("cls", [MultiHeadAttention, Block, TransformerLM])
def test_the_api_tour_shows_the_signature(cls):
    """help() shows the signature the API tour (docs/api_tour.md) documents: the same parameters, in the same order."""
    tour = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "api_tour.md").read_text(encoding="utf-8")
    documented = re.search(rf"^\| `{cls.__name__}\((.*?)\)` \|", tour, re.M).group(1)
    names = [part.split("=")[0].strip() for part in documented.split(", ")]
    assert names == list(inspect.signature(cls).parameters)
