"""What a training run is: TrainConfig, a plain dataclass, and the paper's two settings as named TrainConfigs.

This module imports nothing of minina: train() (minina.tools.train) checks a config once, where the run starts,
and `python -m minina train` builds one from PAPER_CONFIGS (--config) and flags (minina.tools.train_flags).
"""
import dataclasses
import pathlib
from typing import Optional

DTYPES = ("auto", "bf16", "fp16", "fp32")  # what dtype may name; minina.tools.train.autocast_dtype says what each means
DEFAULT_DATASETS = {"lm": "tinyshakespeare", "vit": "cifar10"}  # task -> the dataset a run uses unless told


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; the defaults train a small character-level model on CPU in minutes."""

    task: str = "lm"                  # "lm" or "vit"
    dataset: Optional[str] = None     # a name from minina.tools.data (or, for vit, the path of an ImageFolder tree);
                                      # None: the task's DEFAULT_DATASETS entry
    kind: str = "hybrid"              # "dot", "neural", or "hybrid" (neural in block 1 only, the paper's setting)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    seq_len: int = 128                # lm: tokens per window
    batch_size: int = 32              # per micro-batch, global: split over the processes under torchrun
    grad_accum: int = 1               # micro-batches per optimizer step: a step sees batch_size * grad_accum
    max_steps: int = 1000             # the horizon of the cosine schedule
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0            # max gradient norm; 0 turns clipping off
    eval_every: int = 100
    log_every: int = 10               # read the training loss back from the device this often (progress bar)
    eval_batches: Optional[int] = 20  # None: the whole validation split
    seed: int = 0
    out: Optional[str] = None         # None: runs/<task>-<dataset>-<kind>-seed<seed>
    patch_size: int = 4               # vit
    image_size: Optional[int] = None  # vit: resize images to this size (None: as stored)
    train_size: Optional[int] = None  # vit: use this many training images (None: all)
    proj_dim: Optional[int] = None    # neural score d' (None: head_dim / 32, at least 2)
    score_options: Optional[dict] = None  # more NeuralScore keyword arguments, e.g. {"hidden": "wide"}
    backend: str = "auto"             # neural attention backend, see minina.attention.BACKENDS
    dropout: float = 0.0
    device: str = "auto"              # "auto": CUDA when available, else CPU
    dtype: str = "auto"               # autocast: "auto" (see autocast_dtype), "bf16", "fp16" or "fp32" (none)
    compile: bool = False             # torch.compile the model for training (evaluation runs eagerly)
    download: bool = False            # fetch missing dataset files (checksums verified)

    def __post_init__(self):
        if self.dataset is None:
            self.dataset = DEFAULT_DATASETS.get(self.task)
        if self.out is None and self.dataset is not None:
            dataset = pathlib.Path(self.dataset).name
            self.out = f"runs/{self.task}-{dataset}-{self.kind}-seed{self.seed}"


# The paper's two full-scale settings, for a GPU. Each value names its source: "paper" is the text of DiGiugno &
# Mahmood 2025 (arXiv:2502.17206); "script" is a constant of the released code (github.com/awayfromzel/
# neural-attention-research): nlp_neural_attention/TransformerAD_WK103_Main.py and its Models/ for the LM,
# vision_standard_attention/VisionTransformerAD_MAIN.py (the only vision main script released) and
# vision_neural_attention/Models/ for the ViT. The paper wins where it speaks; the script fills in where it is
# silent. What this loop does differently for every run (schedule, pre-LN, tokenizer, ...) is listed on the
# course site's Training page (docs/training.md).
PAPER_CONFIGS = {
    "paper-lm": TrainConfig(
        task="lm",
        dataset="wikitext103",   # paper (read at word level here; the script uses bert-base-cased tokens)
        kind="hybrid",           # paper and script: Neural Attention in block 1 only (use_neural_attention=(i == 0))
        dim=512,                 # script: SimpleTransformer(dim=512)
        depth=8,                 # script: num_layers=8
        heads=8,                 # script: heads=8, so head_dim 64
        proj_dim=None,           # paper and script: d' = head_dim // 32 = 2
        dropout=0.1,             # script: SimpleTransformer(dropout=0.1) (attention output, feed-forward)
        seq_len=1024,            # script: SEQ_LENGTH = 1024
        batch_size=1,            # script: BATCH_SIZE = 1
        grad_accum=1,            # script: GRADIENT_ACCUMULATE_EVERY = 1
        max_steps=2_000_000,     # script: NUM_BATCHES = int(2e6) + 10
        lr=3e-4,                 # script: LEARNING_RATE = 3e-4 (constant there)
        weight_decay=0.1,        # script: configure_optimizers, decay 0.1 on Linear weights, betas (0.9, 0.95)
        warmup_steps=2000,       # minina's choice (the script has no warmup and no decay)
        grad_clip=1.0,           # script: clip_grad_norm_(..., 1.0)
        eval_every=10_000,       # script: VALIDATE_EVERY = 10000
        eval_batches=1000,       # script: val_count = 1000 validation batches
        out="runs/paper-lm"),
    "paper-vit": TrainConfig(
        task="vit",
        dataset="cifar10",       # paper: CIFAR-10 and CIFAR-100 (the script loads CIFAR100; --dataset cifar100)
        kind="hybrid",           # paper and script: Neural Attention in block 1 only
        dim=768,                 # script: SimpleTransformer(dim=768)
        depth=12,                # script: num_layers=12
        heads=12,                # paper: 12 heads of 64 (the script has heads=8, 96 dims each, so d' = 3 there)
        proj_dim=None,           # paper: d' = head_dim / 32 = 2 at head_dim 64
        dropout=0.1,             # script: dropout 0.1 (position encoding, attention output, feed-forward)
        image_size=224,          # script: get_loaders_cifar(img_width=224, img_height=224)
        patch_size=8,            # script: PatchEmbedding_CNN(patch_size=8), SEQ_LENGTH = 785 = 28 * 28 + 1
        batch_size=1,            # script: BATCH_SIZE = 1
        grad_accum=1,            # script: GRADIENT_ACCUMULATE_EVERY = 1
        max_steps=350 * 50_000,  # script: NUM_EPOCHS = 350 over the 50,000 training images
        lr=5e-5,                 # script: LEARNING_RATE = 0.5e-4 (0.25e-4 after the fifth epoch there)
        weight_decay=0.1,        # script: configure_optimizers, decay 0.1 on Linear weights, betas (0.9, 0.95)
        warmup_steps=2000,       # minina's choice (the script has no warmup)
        grad_clip=1.0,           # script: clip_grad_norm_(..., 1.0)
        eval_every=50_000,       # script: VALIDATE_EVERY = 1 epoch
        eval_batches=None,       # script: the whole test set
        out="runs/paper-vit"),
}
