"""The two tasks `python -m minina train` runs, one small class each: data, model, loss and evaluation.

LanguageModeling ("lm"): a TransformerLM on next-token prediction, validation loss and perplexity.
ImageClassification ("vit"): a VisionTransformer on images, validation loss and accuracy.
Each draws its training batches from a seeded generator whose state a checkpoint keeps, so a resumed run draws the
batches it would have drawn; under DDP every process draws the same global batch and keeps its share.
"""
import math
import pathlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models import TransformerLM, VisionTransformer, next_token_loss
from .data import IMAGE_DATASETS, TEXT_DATASETS, lm_batches, lm_eval_batches, load_images, load_text


def model_options(config):
    """The keyword arguments both models take from a TrainConfig."""
    return dict(dim=config.dim, depth=config.depth, heads=config.heads, kind=config.kind,
                dropout=config.dropout, backend=config.backend, proj_dim=config.proj_dim,
                score_options=config.score_options)


class _Task:
    """What both tasks share: the process's share of a batch, and evaluation over the validation batches."""

    def __init__(self, config, rank, world, device):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        self.generator = torch.Generator().manual_seed(config.seed)

    def _local(self, batch):
        """This process's share of a global batch (the same on every process), moved to the device."""
        return [t.chunk(self.world)[self.rank].to(self.device, non_blocking=True) for t in batch]

    @torch.no_grad()
    def evaluate(self, model, autocast):
        """(validation loss, the task's metric); batch i is evaluated by process i % world."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, predictions, correct
        for number, batch in enumerate(self.eval_batches()):
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
        return val_loss, self.metric_value(val_loss, totals)


class LanguageModeling(_Task):
    """Next-token prediction on a text corpus (minina.tools.data.load_text): random windows of seq_len tokens."""

    metric, items = "perplexity", "tokens"

    @staticmethod
    def check_dataset(name):
        if name not in TEXT_DATASETS:
            raise ValueError(f"dataset for task 'lm' must be one of {sorted(TEXT_DATASETS)}, got {name!r}")

    @staticmethod
    def build_model(config, sizes):
        """sizes: the data's {"vocab_size": ...}; other sizes are ignored."""
        if sizes.get("vocab_size") is None:
            raise ValueError("build_model needs vocab_size for task 'lm'")
        return TransformerLM(sizes["vocab_size"], max_seq_len=config.seq_len, **model_options(config))

    def __init__(self, config, rank, world, device):
        super().__init__(config, rank, world, device)
        self.corpus = load_text(config.dataset, download=config.download)
        self.model_sizes = dict(vocab_size=self.corpus.vocab_size)
        self.items_per_step = config.batch_size * config.grad_accum * config.seq_len

    def state(self):
        """The data position as tensors (safe for torch.load(weights_only=True))."""
        return {"generator": self.generator.get_state()}

    def load_state(self, state):
        self.generator.set_state(state["generator"])

    def train_batch(self):
        config = self.config
        return self._local(lm_batches(self.corpus.train, config.batch_size, config.seq_len, self.generator))

    def loss(self, model, batch, reduction="mean"):
        """Cross-entropy of one batch, and no logits (accuracy is not measured)."""
        inputs, targets = batch
        logits = model(inputs, check_ids=False)  # (B, T, vocab); ids come from the corpus's vocabulary
        return next_token_loss(logits, targets, reduction), None

    def eval_batches(self):
        config = self.config
        return lm_eval_batches(self.corpus.val, config.batch_size, config.seq_len, config.eval_batches)

    def metric_value(self, val_loss, totals):
        return math.exp(min(val_loss, 700))  # perplexity


class ImageClassification(_Task):
    """Image classification (minina.tools.data.load_images): shuffled epochs, the last partial batch dropped."""

    metric, items = "accuracy", "images"

    @staticmethod
    def check_dataset(name):
        if name not in IMAGE_DATASETS and not pathlib.Path(name).is_dir():
            raise ValueError(f"dataset for task 'vit' must be one of {sorted(IMAGE_DATASETS)} or an ImageFolder "
                             f"path, got {name!r}")

    @staticmethod
    def build_model(config, sizes):
        """sizes: the data's {"num_classes", "image_size", "channels"}; other sizes are ignored."""
        if any(sizes.get(name) is None for name in ("num_classes", "image_size", "channels")):
            raise ValueError("build_model needs num_classes, image_size and channels for task 'vit'")
        return VisionTransformer(config.image_size or sizes["image_size"], config.patch_size, sizes["num_classes"],
                                 channels=sizes["channels"], **model_options(config))

    def __init__(self, config, rank, world, device):
        super().__init__(config, rank, world, device)
        self.images = load_images(config.dataset, download=config.download, train_size=config.train_size)
        self.model_sizes = dict(num_classes=self.images.num_classes, image_size=self.images.image_size,
                                channels=self.images.channels)
        self.items_per_step = config.batch_size * config.grad_accum
        self.epoch_start_state = self.generator.get_state()
        self.order = torch.randperm(len(self.images.train), generator=self.generator)
        self.epoch, self.index = 0, 0

    def state(self):
        """The data position as tensors and ints (safe for torch.load(weights_only=True))."""
        return {"generator": self.epoch_start_state, "epoch": self.epoch, "index": self.index}

    def load_state(self, state):
        self.generator.set_state(state["generator"])
        self.epoch_start_state = state["generator"]
        self.order = torch.randperm(len(self.images.train), generator=self.generator)
        self.epoch, self.index = state["epoch"], state["index"]

    def train_batch(self):
        batch_size = self.config.batch_size
        if self.index + batch_size > len(self.order):  # a new epoch; the partial last batch is dropped
            self.epoch_start_state = self.generator.get_state()
            self.order = torch.randperm(len(self.images.train), generator=self.generator)
            self.epoch, self.index = self.epoch + 1, 0
        chosen = self.order[self.index:self.index + batch_size]  # (B,)
        self.index += batch_size
        return self._local((self.images.train.images[chosen], self.images.train.labels[chosen]))

    def loss(self, model, batch, reduction="mean"):
        """Cross-entropy of one batch, and its logits (B, classes) for the accuracy."""
        inputs, targets = batch
        images = self.images.train.normalize(inputs)  # (B, C, H, W)
        if self.config.image_size is not None:
            images = F.interpolate(images, size=self.config.image_size, mode="bilinear", align_corners=False)
        logits = model(images).float()  # (B, classes)
        return F.cross_entropy(logits, targets, reduction=reduction), logits

    def eval_batches(self):
        config, test = self.config, self.images.test
        # a fixed shuffle, so that a few batches of a class-sorted folder still see every class
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))  # (N,)
        for number, first in enumerate(range(0, len(test), config.batch_size)):
            if config.eval_batches is not None and number >= config.eval_batches:
                return
            chosen = order[first:first + config.batch_size]  # (B,)
            yield test.images[chosen], test.labels[chosen]

    def metric_value(self, val_loss, totals):
        return (totals[2] / totals[1]).item()  # accuracy in [0, 1]


TRAIN_TASKS = {"lm": LanguageModeling, "vit": ImageClassification}
