"""The two models of the paper's experiments: a GPT-style language model and a Vision Transformer.

`kind` chooses the attention of each block: "dot", "neural", "hybrid" (neural in the first block only, the paper's
setting) or a list with one kind per block. proj_dim and score_options reach the neural blocks only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import KINDS, Block

MODEL_KINDS = KINDS + ("hybrid",)  # what a model's `kind` may name: a kind for every block, or hybrid


def block_kinds(kind, depth):
    """The attention kind of each of `depth` blocks, from a model's kind (see MODEL_KINDS) or list of kinds."""
    if isinstance(kind, str):
        if kind == "hybrid":
            return ["neural"] + ["dot"] * (depth - 1)
        if kind in KINDS:
            return [kind] * depth
        raise ValueError(f"kind must be one of {MODEL_KINDS} or a list of kinds, got {kind!r}")
    kinds = list(kind)
    if len(kinds) != depth or any(entry not in KINDS for entry in kinds):
        raise ValueError(f"kind as a list needs {depth} entries from {KINDS}, got {kinds!r}")
    return kinds


def next_token_loss(logits, targets, reduction="mean"):
    """Cross-entropy of logits (B, T, vocab) against the next tokens targets (B, T), computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _init_transformer(model):
    """GPT-2 init (N(0, 0.02)) for the Transformer's layers; each NeuralScore keeps its own (PyTorch default) init,
    as the paper's code does."""
    for name, module in model.named_modules():
        if ".score" not in name and not name.endswith("score"):
            _init_weights(module)


class TransformerLM(nn.Module):
    """Decoder-only causal language model: tokens (B, T) -> next-token logits (B, T, vocab_size).

    kind: "dot", "neural", "hybrid" or one kind per block (block_kinds); head_dim, proj_dim, backend and
    score_options are MultiHeadAttention's, given to every block (a dot block ignores proj_dim and score_options).
    """

    def __init__(self, vocab_size, dim, depth, heads, max_seq_len, kind="dot", mlp_ratio=4, dropout=0.0,
                 head_dim=None, proj_dim=None, backend="auto", score_options=None):
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.kinds = block_kinds(kind, depth)
        self.token_emb = nn.Embedding(vocab_size, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, block_kind, is_causal=True, mlp_ratio=mlp_ratio, dropout=dropout, head_dim=head_dim,
                  proj_dim=proj_dim, backend=backend, score_options=score_options) for block_kind in self.kinds)
        self.ln_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        _init_transformer(self)
        self.head.weight = self.token_emb.weight  # weight tying (Press & Wolf 2017), as in GPT-2

    def forward(self, idx, check_ids=True):
        """idx (B, T) of token ids, T <= max_seq_len -> logits (B, T, vocab_size).

        check_ids verifies 0 <= idx < vocab_size (an id outside would be an IndexError on CPU and a device-side
        assert that ends the process on CUDA); it reads one number back from the device, so a caller whose ids
        are known to be valid (minina.tools.train's, drawn from the corpus) passes check_ids=False to never wait for it.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype not in (torch.long, torch.int):
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        T = idx.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.max_seq_len} (idx {tuple(idx.shape)})")
        if check_ids and ((idx < 0) | (idx >= self.vocab_size)).any():
            raise ValueError(f"idx must hold token ids in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{idx.min().item()}, {idx.max().item()}] (idx {tuple(idx.shape)})")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.token_emb(idx) + self.pos_emb(pos))  # (B, T, dim)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x))  # (B, T, vocab_size)

    def loss(self, idx, targets):
        """Mean next-token cross-entropy of idx (B, T) against targets (B, T) of ids in [0, vocab_size)."""
        if not isinstance(targets, torch.Tensor) or targets.shape != getattr(idx, "shape", None):
            raise ValueError(f"targets must have the shape of idx {tuple(getattr(idx, 'shape', ()))}, got "
                             f"{tuple(getattr(targets, 'shape', ()))}")
        if ((targets < 0) | (targets >= self.vocab_size)).any():
            raise ValueError(f"targets must hold token ids in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{targets.min().item()}, {targets.max().item()}]")
        return next_token_loss(self(idx), targets)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample max_new_tokens tokens after idx (B, T), T >= 1; returns (B, T + max_new_tokens).

        top_k None samples from the whole vocabulary, an int >= 1 from the top_k most likely tokens only.
        """
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"idx must be a prompt of shape (B, T) with T >= 1 (generation continues a prompt), "
                             f"got {tuple(getattr(idx, 'shape', ()))}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.max_seq_len:])[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_token], dim=1)
        return idx


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches + class token -> blocks -> class logits; (B, C, H, W) -> (B, classes).

    kind, head_dim, proj_dim, backend and score_options as for TransformerLM.
    """

    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, channels=3, kind="dot",
                 mlp_ratio=4, dropout=0.0, head_dim=None, proj_dim=None, backend="auto", score_options=None):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.image_size, self.channels = image_size, channels
        self.kinds = block_kinds(kind, depth)
        num_patches = (image_size // patch_size) ** 2
        self.patch_emb = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(dim, heads, block_kind, is_causal=False, mlp_ratio=mlp_ratio, dropout=dropout, head_dim=head_dim,
                  proj_dim=proj_dim, backend=backend, score_options=score_options) for block_kind in self.kinds)
        self.ln_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        _init_transformer(self)

    def tokens(self, images):
        """The (B, 1 + patches, dim) token sequence entering the first block."""
        expected = (self.channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {', '.join(map(str, expected))}), got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        x = self.patch_emb(images).flatten(2).transpose(1, 2)  # (B, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        return self.drop(torch.cat([cls, x], dim=1) + self.pos_emb)  # (B, 1 + patches, dim)

    def forward(self, images):
        """images (B, channels, image_size, image_size) -> logits (B, num_classes)."""
        x = self.tokens(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_out(x[:, 0]))  # (B, num_classes)
