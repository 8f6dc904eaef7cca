"""`python -m minina train`: one small, resumable training loop for the paper's two experiments.

task "lm": a TransformerLM on next-token prediction (validation loss and perplexity); task "vit": a
VisionTransformer on image classification (validation loss and accuracy). AdamW (weight decay on Linear and Conv
weights only), linear warmup then cosine decay, gradient clipping, gradient accumulation, autocast (bf16 on GPUs
that have it, fp16 with a gradient scaler on older ones, fp32 on CPU), optional torch.compile,
DistributedDataParallel when launched by torchrun (NCCL on GPUs, gloo on CPU). The step never waits for the device:
losses are summed on it and read back every log_every steps (progress bar) and at evaluations. Every eval_every
steps: evaluate, append a row to out/metrics.csv, write out/checkpoint.pt atomically. Ctrl-C finishes the current
step, saves a checkpoint and stops; resume=True continues exactly where it stopped.
"""
import argparse
import contextlib
import csv
import dataclasses
import inspect
import json
import math
import os
import pathlib
import signal
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import BACKENDS
from .data import IMAGE_DATASETS, TEXT_DATASETS, atomic_save, lm_batches, lm_eval_batches, load_images, load_text
from .models import TransformerLM, VisionTransformer
from .scores import RELIABLE_SCORE_OPTIONS, NeuralScore

HELP = "train a language model or a ViT with dot, neural or hybrid attention (resumable, torchrun-ready)"
TASKS = ("lm", "vit")
ATTENTIONS = ("dot", "neural", "hybrid")
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEFAULT_DATASETS = {"lm": "tinyshakespeare", "vit": "cifar10"}
MIB = 2 ** 20


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; the defaults train a small character-level model on CPU in minutes."""

    task: str = "lm"                  # "lm" or "vit"
    dataset: Optional[str] = None     # a name from minina.data (or, for vit, the path of an ImageFolder tree);
                                      # None: DEFAULT_DATASETS[task]
    attention: str = "hybrid"         # "dot", "neural", or "hybrid" (neural in block 1 only, the paper's setting)
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
    out: Optional[str] = None         # None: runs/<task>-<dataset>-<attention>-seed<seed>
    patch_size: int = 4               # vit
    image_size: Optional[int] = None  # vit: resize images to this size (None: as stored)
    train_size: Optional[int] = None  # vit: use this many training images (None: all)
    proj_dim: Optional[int] = None    # neural score d' (None: head_dim / 32, at least 2)
    score_options: Optional[dict] = None  # more NeuralScore keyword arguments, e.g. {"init": "kaiming"}
    backend: str = "auto"             # neural attention backend, see minina.attention.BACKENDS
    dropout: float = 0.0
    device: str = "auto"              # "auto": CUDA when available, else CPU
    dtype: str = "auto"               # autocast: "auto" (see autocast_dtype), "bf16", "fp16" or "fp32" (none)
    compile: bool = False             # torch.compile the model for training (evaluation runs eagerly)
    download: bool = False            # fetch missing dataset files (checksums verified)

    def __post_init__(self):
        if self.dataset is None:
            self.dataset = DEFAULT_DATASETS.get(self.task)
        if self.out is None:
            dataset = pathlib.Path(self.dataset).name
            self.out = f"runs/{self.task}-{dataset}-{self.attention}-seed{self.seed}"


# The paper's two full-scale settings, for a GPU. Each value names its source: "paper" is the text of DiGiugno &
# Mahmood 2025 (arXiv:2502.17206); "script" is a constant of the released code (github.com/awayfromzel/
# neural-attention-research): nlp_neural_attention/TransformerAD_WK103_Main.py and its Models/ for the LM,
# vision_standard_attention/VisionTransformerAD_MAIN.py (the only vision main script released) and
# vision_neural_attention/Models/ for the ViT. The paper wins where it speaks; the script fills in where it is
# silent. What this loop does differently for every run (schedule, pre-LN, tokenizer, ...) is listed in the
# README's Training section.
CONFIGS = {
    "paper-lm": TrainConfig(
        task="lm",
        dataset="wikitext103",   # paper (read at word level here; the script uses bert-base-cased tokens)
        attention="hybrid",      # paper and script: Neural Attention in block 1 only (use_neural_attention=(i == 0))
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
        attention="hybrid",      # paper and script: Neural Attention in block 1 only
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

# Fields a resumed run may change; any other difference from the checkpoint's config is an error.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "eval_batches", "log_every", "out", "backend", "device", "dtype",
                     "compile", "download")


def check_config(config):
    """Raise ValueError naming the field when a TrainConfig value cannot work."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {config.task!r}")
    if config.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {config.attention!r}")
    names = TEXT_DATASETS if config.task == "lm" else IMAGE_DATASETS
    if config.dataset not in names and (config.task == "lm" or not pathlib.Path(config.dataset).is_dir()):
        raise ValueError(f"dataset for task {config.task!r} must be one of {sorted(names)}"
                         f"{' or an ImageFolder path' if config.task == 'vit' else ''}, got {config.dataset!r}")
    for name in ("dim", "depth", "heads", "seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                 "log_every", "patch_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("eval_batches", "image_size", "train_size", "proj_dim"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if config.dim % config.heads:
        raise ValueError(f"dim ({config.dim}) must be divisible by heads ({config.heads})")
    if not config.lr > 0:
        raise ValueError(f"lr must be > 0, got {config.lr!r}")
    for name in ("weight_decay", "grad_clip", "warmup_steps"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)!r}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout!r}")
    _check_score_options(config)
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if not isinstance(config.compile, bool):
        raise ValueError(f"compile must be a bool, got {config.compile!r}")
    if config.device != "auto":
        try:
            torch.device(config.device)
        except RuntimeError:
            raise ValueError(f"device must be 'auto' or a torch device such as 'cpu' or 'cuda:0', "
                             f"got {config.device!r}") from None


def _check_score_options(config):
    """score_options must be keyword arguments NeuralScore takes, with values it accepts."""
    options = config.score_options
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"score_options must be a dict or None, got {type(options).__name__}")
    known = [name for name in inspect.signature(NeuralScore).parameters if name not in ("head_dim", "proj_dim")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"score_options has unknown key(s) {unknown}: NeuralScore takes {known} (proj_dim has its "
                         f"own flag), e.g. {json.dumps(RELIABLE_SCORE_OPTIONS)}")
    try:
        NeuralScore(config.dim // config.heads, config.proj_dim, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"score_options {options}: {error}") from None


def check_device(device):
    """Raise ValueError when device ("auto" or a torch device) names a GPU this machine does not have."""
    if device == "auto" or torch.device(device).type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} needs a CUDA GPU, but torch.cuda.is_available() is False here (no "
                         "NVIDIA GPU or driver, or a CPU-only PyTorch); use --device cpu, or auto to take a GPU "
                         "where there is one")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")


def build_model(config, vocab_size=None, num_classes=None, image_size=None, channels=None):
    """The TransformerLM (task "lm", needs vocab_size) or VisionTransformer (task "vit") that config describes.

    For vit, image_size and channels are the data's; config.image_size, when set, overrides image_size.
    """
    check_config(config)
    common = dict(dim=config.dim, depth=config.depth, heads=config.heads, attention=config.attention,
                  dropout=config.dropout, backend=config.backend, proj_dim=config.proj_dim,
                  score_options=config.score_options)
    if config.task == "lm":
        if vocab_size is None:
            raise ValueError("build_model needs vocab_size for task 'lm'")
        model = TransformerLM(vocab_size, max_seq_len=config.seq_len, **common)
    else:
        if num_classes is None or image_size is None or channels is None:
            raise ValueError("build_model needs num_classes, image_size and channels for task 'vit'")
        model = VisionTransformer(config.image_size or image_size, config.patch_size, num_classes,
                                  channels=channels, **common)
    return model


def learning_rate_factor(step, warmup_steps, max_steps, final_factor=0.1):
    """Multiplier of lr at step: linear warmup to 1 over warmup_steps, then cosine decay to final_factor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(dtype, device_type, capability=None):
    """The torch dtype that config.dtype means on a device; torch.float32 means no autocast.

    "auto": bf16 on CUDA GPUs of compute capability (major, minor) >= (8, 0) (A100, H100, RTX 30xx and later),
    fp16 on older ones (T4, V100: no bf16; the loop adds a gradient scaler), fp32 on any other device.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device_type == "cuda" and capability is None:
        raise ValueError("autocast_dtype needs the GPU's capability, e.g. torch.cuda.get_device_capability(device)")
    has_bf16 = device_type != "cuda" or tuple(capability) >= (8, 0)
    if dtype == "auto":
        return torch.float32 if device_type != "cuda" else torch.bfloat16 if has_bf16 else torch.float16
    if dtype == "bf16" and not has_bf16:
        raise ValueError(f"dtype 'bf16' needs a GPU of compute capability 8.0 or more, this one has "
                         f"{'.'.join(map(str, capability))}; use --dtype fp16 (or auto)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


DECAYED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def make_optimizer(model, config):
    """AdamW (betas 0.9, 0.95, as the paper's code) with config.weight_decay on Linear and Conv weights only.

    Biases, LayerNorms, embeddings (token and position, the ViT's cls_token and pos_emb), a learned logit scale
    and the score MLP's biases get no decay; a weight shared with an embedding (the LM's tied output head) counts
    as the embedding. Fused AdamW when every parameter is on CUDA.
    """
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED_LAYERS)}
    decayed -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    parameters = [p for p in model.parameters() if p.requires_grad]  # each shared tensor once
    groups = [{"params": [p for p in parameters if id(p) in decayed], "weight_decay": config.weight_decay},
              {"params": [p for p in parameters if id(p) not in decayed], "weight_decay": 0.0}]
    fused = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused or None)


class _Task:
    """The data side of a run: draws training batches (state kept for checkpoints), computes loss, evaluates."""

    def __init__(self, config, rank, world, device):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.generator = torch.Generator().manual_seed(config.seed)
        if config.task == "lm":
            self.corpus = load_text(config.dataset, download=config.download)
            self.model_sizes = dict(vocab_size=self.corpus.vocab_size)
            self.items, self.metric = "tokens", "perplexity"
        else:
            self.images = load_images(config.dataset, download=config.download, train_size=config.train_size)
            self.model_sizes = dict(num_classes=self.images.num_classes, image_size=self.images.image_size,
                                    channels=self.images.channels)
            self.items, self.metric = "images", "accuracy"
            self.epoch_start_state = self.generator.get_state()
            self.order = torch.randperm(len(self.images.train), generator=self.generator)
            self.epoch, self.index = 0, 0

    def state(self):
        """The data position as tensors and ints (safe for torch.load(weights_only=True))."""
        if self.config.task == "lm":
            return {"generator": self.generator.get_state()}
        return {"generator": self.epoch_start_state, "epoch": self.epoch, "index": self.index}

    def load_state(self, state):
        self.generator.set_state(state["generator"])
        if self.config.task == "vit":
            self.epoch_start_state = state["generator"]
            self.order = torch.randperm(len(self.images.train), generator=self.generator)
            self.epoch, self.index = state["epoch"], state["index"]

    def _local(self, batch):
        """This process's share of a global batch (the same on every process), moved to the device."""
        return [t.chunk(self.world)[self.rank].to(self.device, non_blocking=True) for t in batch]

    def train_batch(self):
        config = self.config
        if config.task == "lm":
            return self._local(lm_batches(self.corpus.train, config.batch_size, config.seq_len, self.generator))
        if self.index + config.batch_size > len(self.order):  # a new epoch; the partial last batch is dropped
            self.epoch_start_state = self.generator.get_state()
            self.order = torch.randperm(len(self.images.train), generator=self.generator)
            self.epoch, self.index = self.epoch + 1, 0
        chosen = self.order[self.index:self.index + config.batch_size]  # (B,)
        self.index += config.batch_size
        return self._local((self.images.train.images[chosen], self.images.train.labels[chosen]))

    def loss(self, model, batch, reduction="mean"):
        """Cross-entropy of one batch, and the number of predictions it averages over."""
        inputs, targets = batch
        if self.config.task == "lm":
            logits = model(inputs, check_ids=False)  # (B, T, vocab); ids come from the corpus's vocabulary
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction), None
        images = self.images.train.normalize(inputs)  # (B, C, H, W)
        if self.config.image_size is not None:
            images = F.interpolate(images, size=self.config.image_size, mode="bilinear", align_corners=False)
        logits = model(images).float()  # (B, classes)
        return F.cross_entropy(logits, targets, reduction=reduction), logits

    def _eval_batches(self):
        config = self.config
        if config.task == "lm":
            yield from lm_eval_batches(self.corpus.val, config.batch_size, config.seq_len, config.eval_batches)
            return
        test = self.images.test
        # a fixed shuffle, so that a few batches of a class-sorted folder still see every class
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))  # (N,)
        for number, first in enumerate(range(0, len(test), config.batch_size)):
            if config.eval_batches is not None and number >= config.eval_batches:
                return
            chosen = order[first:first + config.batch_size]  # (B,)
            yield test.images[chosen], test.labels[chosen]

    @torch.no_grad()
    def evaluate(self, model, autocast):
        """(validation loss, perplexity or accuracy in [0, 1]); batch i is evaluated by process i % world."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, predictions, correct
        for number, batch in enumerate(self._eval_batches()):
            if number % self.world != self.rank:
                continue
            inputs, targets = (t.to(self.device) for t in batch)
            with autocast():
                loss, logits = self.loss(model, (inputs, targets), reduction="sum")
            totals[0] += loss.double()
            totals[1] += targets.numel()
            if logits is not None:
                totals[2] += (logits.argmax(dim=-1) == targets).sum()
        if self.world > 1:
            dist.all_reduce(totals)
        val_loss = (totals[0] / totals[1]).item()
        return val_loss, math.exp(min(val_loss, 700)) if self.config.task == "lm" else (totals[2] / totals[1]).item()


def _distributed_setup(config):
    """(rank, world_size, device); joins the process group when launched by torchrun."""
    cuda = config.device == "auto" and torch.cuda.is_available() or config.device.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(("cuda" if cuda else "cpu") if config.device == "auto" else config.device)
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


class _StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) or SIGTERM (torchrun, schedulers) only sets .requested, so the loop
    can stop at a step boundary; a second one acts as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        try:
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        except ValueError:  # not the main thread: leave the signals alone
            self.previous = {}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _metrics_header(task):
    return ["step", "train_loss", "val_loss", "perplexity" if task == "lm" else "accuracy",
            "lr", "tokens_per_s" if task == "lm" else "images_per_s", "peak_memory_mib"]


def _start_metrics(path, task, keep_until_step):
    """Write metrics.csv's header, keeping the rows up to keep_until_step (a resumed run's checkpoint)."""
    rows = []
    if keep_until_step is not None and path.is_file():
        with open(path, newline="") as file:
            rows = [row for row in list(csv.reader(file))[1:] if int(row[0]) <= keep_until_step]
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", newline="") as file:
        csv.writer(file).writerows([_metrics_header(task)] + rows)
    os.replace(temporary, path)


def _check_resumable(saved, config):
    current = dataclasses.asdict(config)
    saved = {**dataclasses.asdict(TrainConfig(out="")), **saved}  # a field newer than the checkpoint: its default
    changed = sorted(name for name in current if name not in RESUMABLE_CHANGES and saved.get(name) != current[name])
    if changed:
        details = ", ".join(f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}" for name in changed)
        raise ValueError(f"cannot resume: the config differs from the checkpoint's in {details}")


def summary_line(summary):
    """One line that says how a run ended."""
    if summary["val_loss"] is None:
        evaluation = "not evaluated yet"
    elif "perplexity" in summary:
        evaluation = f"val_loss {summary['val_loss']:.4f}, perplexity {summary['perplexity']:.2f}"
    else:
        evaluation = f"val_loss {summary['val_loss']:.4f}, accuracy {100 * summary['accuracy']:.1f}%"
    state = ("interrupted; " if summary["interrupted"] else "") + (
        "paused, continue with --resume; " if summary["stopped_early"] else "")
    return (f"{state}step {summary['steps']}: {evaluation}, {summary['params']:,} parameters, "
            f"{summary['seconds_per_step']:.3f} s/step -> {summary['out']}")


def train(config, resume=False, progress=True, stop_after=None):
    """Train as config says; returns a summary dict.

    Summary: val_loss, perplexity (lm) or accuracy (vit) of the last evaluation, train_loss (mean over the last
    evaluation interval), params, seconds_per_step (this session), steps, out, stopped_early, interrupted (by
    Ctrl-C or SIGTERM). Writes out/config.json, out/metrics.csv and out/checkpoint.pt. resume=True continues from
    out/checkpoint.pt exactly as if never stopped. stop_after=N pauses after step N (keeping the schedule of
    max_steps), like a Ctrl-C there.
    """
    check_config(config)
    check_device(config.device)
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be a positive int or None, got {stop_after!r}")
    out = pathlib.Path(config.out)
    checkpoint_path = out / "checkpoint.pt"
    if resume and not checkpoint_path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {checkpoint_path}; run without --resume to start")
    rank, world, device = _distributed_setup(config)
    try:
        if config.batch_size % world:
            raise ValueError(f"batch_size ({config.batch_size}) must be divisible by the number of processes "
                             f"({world})")
        summary = _train(config, resume, progress and rank == 0, stop_after, rank, world, device, out, checkpoint_path)
        if world > 1:
            dist.barrier()  # no rank tears down its connections while another may still be using them
        return summary
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(config, resume, progress, stop_after, rank, world, device, out, checkpoint_path):
    torch.manual_seed(config.seed)
    cuda = device.type == "cuda"
    amp_dtype = autocast_dtype(config.dtype, device.type, torch.cuda.get_device_capability(device) if cuda else None)
    if cuda:  # TF32 tensor cores for the fp32 matmuls and convolutions left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    task = _Task(config, rank, world, device)
    model = build_model(config, **task.model_sizes).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, config.warmup_steps, config.max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 gradients underflow
    step, last_eval = 0, {"val_loss": None, task.metric: None, "train_loss": None}
    loss_sum, loss_steps = torch.zeros((), dtype=torch.float64, device=device), 0  # since the last evaluation
    if resume:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        _check_resumable(checkpoint["config"], config)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if scaler.is_enabled() and checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        task.load_state(checkpoint["data"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if cuda and checkpoint["rng"]["cuda"].numel():
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        step, loss_steps = checkpoint["step"], checkpoint["loss_steps"]
        loss_sum.fill_(checkpoint["loss_sum"])
        last_eval = checkpoint["last_eval"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        temporary = out / "config.json.tmp"
        temporary.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        os.replace(temporary, out / "config.json")
        _start_metrics(out / "metrics.csv", config.task, step if resume else None)
    distributed = None if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if cuda else None)
    trained = model if distributed is None else distributed
    if config.compile:
        trained = torch.compile(trained)

    def autocast():
        enabled = amp_dtype != torch.float32
        return torch.autocast(device.type, dtype=amp_dtype if enabled else None, enabled=enabled)

    def save_checkpoint():
        if rank == 0:
            atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                         "config": dataclasses.asdict(config), "data": task.state(), "loss_sum": loss_sum.item(),
                         "loss_steps": loss_steps, "last_eval": last_eval,
                         "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda
                                 else torch.zeros(0, dtype=torch.uint8)}}, checkpoint_path)

    def micro_batch_context(micro):  # under DDP, gradients are averaged over processes once per step
        last = micro == config.grad_accum - 1
        return contextlib.nullcontext() if distributed is None or last else distributed.no_sync()

    items_per_step = config.batch_size * config.grad_accum * (config.seq_len if config.task == "lm" else 1)
    session_seconds, session_steps, interval_steps = 0.0, 0, 0
    end = min(config.max_steps, stop_after or config.max_steps)
    bar = tqdm(total=config.max_steps, initial=step, desc=f"{config.task} {config.attention}", unit="step",
               disable=not progress)

    def stop_requested():  # all processes must stop after the same step: they agree every log_every steps
        if world == 1:
            return interrupt.requested
        if step % config.log_every:
            return False
        flag = torch.tensor([float(interrupt.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()  # wall-clock time is read where the host waits for the device anyway
    with _StopOnInterrupt() as interrupt:
        while step < end and not stop_requested():
            trained.train()
            lr = scheduler.get_last_lr()[0]
            for micro in range(config.grad_accum):
                batch = task.train_batch()
                with micro_batch_context(micro):
                    with autocast():
                        loss, _ = task.loss(trained, batch)
                    scaler.scale(loss / config.grad_accum).backward()
                loss_sum += loss.detach().double() / config.grad_accum  # on the device: no wait
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step, loss_steps, session_steps, interval_steps = step + 1, loss_steps + 1, session_steps + 1, \
                interval_steps + 1
            bar.update(1)
            if progress and step % config.log_every == 0:
                bar.set_postfix(loss=f"{(loss_sum / loss_steps).item():.3f}", refresh=False)
            if step % config.eval_every == 0 or step == config.max_steps:
                train_loss = torch.stack([loss_sum, torch.tensor(float(loss_steps), dtype=torch.float64,
                                                                 device=device)])
                if world > 1:
                    dist.all_reduce(train_loss)
                train_loss = (train_loss[0] / train_loss[1]).item()  # waits for the device: time the interval
                seconds = time.perf_counter() - started
                peak = f"{torch.cuda.max_memory_allocated(device) / MIB:.1f}" if cuda else ""
                session_seconds += seconds
                trained.eval()
                val_loss, metric = task.evaluate(model, autocast)
                last_eval = {"val_loss": val_loss, task.metric: metric, "train_loss": train_loss}
                if rank == 0:
                    with open(out / "metrics.csv", "a", newline="") as file:
                        csv.writer(file).writerow([step, f"{train_loss:.8g}", f"{val_loss:.8g}", f"{metric:.8g}",
                                                   f"{lr:.6g}", f"{items_per_step * interval_steps / seconds:.1f}",
                                                   peak])
                bar.set_postfix(loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}")
                loss_sum.zero_()
                loss_steps, interval_steps = 0, 0
                save_checkpoint()
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                started = time.perf_counter()
        if interval_steps:  # the steps after the last evaluation
            if cuda:
                torch.cuda.synchronize(device)
            session_seconds += time.perf_counter() - started
        stopped_early = step < config.max_steps
        if stopped_early:
            save_checkpoint()
    bar.close()
    summary = {**last_eval, "params": params, "seconds_per_step": session_seconds / max(1, session_steps),
               "steps": step, "out": str(out), "stopped_early": stopped_early,
               "interrupted": stopped_early and step < end}
    if progress:
        print(summary_line(summary), flush=True)
    return summary


# help for the flags whose default alone says too little
FLAG_HELP = {
    "dataset": f"lm: {', '.join(sorted(TEXT_DATASETS))}; vit: {', '.join(IMAGE_DATASETS)} or the path of an "
               f"ImageFolder tree (default: {DEFAULT_DATASETS['lm']} for lm, {DEFAULT_DATASETS['vit']} for vit)",
    "out": "output folder (default runs/<task>-<dataset>-<attention>-seed<seed>)",
    "image_size": "vit: resize the images to this many pixels a side (default: as stored)",
    "train_size": "vit: train on only the first this many training images (default: all)",
    "proj_dim": "d' of the neural score (default: head_dim / 32, at least 2, the paper's)",
    "device": "auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N",
}


def _json_object(text):
    """argparse type of --score-options: a JSON object, or a message showing how to write one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as {json.dumps(RELIABLE_SCORE_OPTIONS)} "
                                         f"(names and strings in double quotes), got {text!r}")
    return value


def add_arguments(parser):
    defaults = TrainConfig()
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="start from a named config (the paper's full-scale settings); flags override it")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "download":
            parser.add_argument(flag, action="store_true", default=None, help="fetch missing dataset files")
        elif field.name == "compile":
            parser.add_argument(flag, action="store_true", default=None,
                                help="torch.compile the model for training (needs a C++ compiler on CPU)")
        elif field.name == "score_options":
            parser.add_argument(flag, type=_json_object, metavar="JSON",
                                help="more NeuralScore keyword arguments as a JSON object, e.g. the learnability "
                                     "study's pick (minina.scores.RELIABLE_SCORE_OPTIONS): "
                                     f"{json.dumps(RELIABLE_SCORE_OPTIONS)}")
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if field.name in ("eval_batches", "image_size", "train_size", "proj_dim"):
                kind = int
            choices = {"task": TASKS, "attention": ATTENTIONS, "backend": BACKENDS, "dtype": DTYPES}.get(field.name)
            parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else field.name.upper(),
                                help=FLAG_HELP.get(field.name, f"default {default}"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="pause after this many steps (schedule still for --max-steps); continue with --resume")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (default when training on the CPU: 1, the fastest for minina's CPU-sized "
                             "models, which thrash on a busy machine with more; otherwise PyTorch's)")


def config_from_args(args):
    """The TrainConfig the command line describes: a named config (or the defaults) with the flags given on top."""
    base = CONFIGS[args.config] if args.config else TrainConfig()
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
             if getattr(args, field.name) is not None}
    if not args.config:  # recompute the defaults that depend on other flags (the task's dataset, the folder name)
        given = {"dataset": None, "out": None, **given}
    return dataclasses.replace(base, **given)


def main(args):
    try:
        config = config_from_args(args)
        check_config(config)
        check_device(config.device)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
    except ValueError as error:  # a mistake in the flags: one line and exit code 2, as argparse's own
        raise argparse.ArgumentError(None, str(error)) from None
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    threads = args.threads if args.threads is not None else 1 if on_cpu else None
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        summary = train(config, resume=args.resume, stop_after=args.stop_after)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    if summary["interrupted"]:
        raise SystemExit(130)  # the shell's code for Ctrl-C; the checkpoint is saved
