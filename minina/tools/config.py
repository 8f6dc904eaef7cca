"""The configuration of a training run: TrainConfig, the paper's settings, their checks, and their flags.

A run is one TrainConfig, a plain dataclass; `python -m minina train` builds it from PAPER_CONFIGS (--config) and
flags with config_from_args. check_config names the field whose value cannot work.
"""
import argparse
import dataclasses
import inspect
import json
import pathlib
from typing import Optional

import torch

from ..attention import BACKENDS, check_backend
from ..models import ATTENTIONS
from ..scores import RELIABLE_SCORE_OPTIONS, NeuralScore
from .candidates import REJECTED_OPTIONS
from .data import IMAGE_DATASETS, TEXT_DATASETS
from .train_tasks import TRAIN_TASKS

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on; the defaults train a small character-level model on CPU in minutes."""

    task: str = "lm"                  # "lm" or "vit"
    dataset: Optional[str] = None     # a name from minina.tools.data (or, for vit, the path of an ImageFolder tree);
                                      # None: the task's default_dataset
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
    score_options: Optional[dict] = None  # more NeuralScore keyword arguments, e.g. {"hidden": "wide"}
    backend: str = "auto"             # neural attention backend, see minina.attention.BACKENDS
    dropout: float = 0.0
    device: str = "auto"              # "auto": CUDA when available, else CPU
    dtype: str = "auto"               # autocast: "auto" (see autocast_dtype), "bf16", "fp16" or "fp32" (none)
    compile: bool = False             # torch.compile the model for training (evaluation runs eagerly)
    download: bool = False            # fetch missing dataset files (checksums verified)

    def __post_init__(self):
        if self.dataset is None:
            self.dataset = TRAIN_TASKS[self.task].default_dataset if self.task in TRAIN_TASKS else None
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
PAPER_CONFIGS = {
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


def check_config(config):
    """Raise ValueError naming the field when a TrainConfig value cannot work."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.task not in TRAIN_TASKS:
        raise ValueError(f"task must be one of {tuple(TRAIN_TASKS)}, got {config.task!r}")
    if config.attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {config.attention!r}")
    TRAIN_TASKS[config.task].check_dataset(config.dataset)
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
    check_backend(config.backend)
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
    rejected = [name for name in options if name in REJECTED_OPTIONS]
    rejected += ["activation='leaky_relu'"] if options.get("activation") == "leaky_relu" else []
    hint = (f"; {', '.join(rejected)}: rejected by the learnability study, only its probes take "
            f"{'it' if len(rejected) == 1 else 'them'} (minina.tools.candidates)" if rejected else "")
    known = [name for name in inspect.signature(NeuralScore).parameters if name not in ("head_dim", "proj_dim")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"score_options has unknown key(s) {unknown}: NeuralScore takes {known} (proj_dim has its "
                         f"own flag), e.g. {json.dumps(RELIABLE_SCORE_OPTIONS)}{hint}")
    try:
        NeuralScore(config.dim // config.heads, config.proj_dim, **options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"score_options {options}: {error}{hint}") from None


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


# help for the flags whose default alone says too little
FLAG_HELP = {
    "dataset": f"lm: {', '.join(sorted(TEXT_DATASETS))}; vit: {', '.join(IMAGE_DATASETS)} or the path of an "
               f"ImageFolder tree (default: {TRAIN_TASKS['lm'].default_dataset} for lm, "
               f"{TRAIN_TASKS['vit'].default_dataset} for vit)",
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


def add_config_flags(parser):
    """One flag per TrainConfig field, and --config NAME to start from a named config."""
    defaults = TrainConfig()
    parser.add_argument("--config", choices=sorted(PAPER_CONFIGS),
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
            choices = {"task": tuple(TRAIN_TASKS), "attention": ATTENTIONS, "backend": BACKENDS,
                       "dtype": DTYPES}.get(field.name)
            parser.add_argument(flag, type=kind, choices=choices, metavar=None if choices else field.name.upper(),
                                help=FLAG_HELP.get(field.name, f"default {default}"))


def config_from_args(args):
    """The TrainConfig the command line describes: a named config (or the defaults) with the flags given on top."""
    base = PAPER_CONFIGS[args.config] if args.config else TrainConfig()
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
             if getattr(args, field.name) is not None}
    if not args.config:  # recompute the defaults that depend on other flags (the task's dataset, the folder name)
        given = {"dataset": None, "out": None, **given}
    return dataclasses.replace(base, **given)
