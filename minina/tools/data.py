"""The datasets of the paper's experiments, read from local files (downloaded, with checksums, only when asked).

Text: `load_text` gives token ids for Tiny Shakespeare (characters), WikiText-2/103 (words) and the generated
recall task of minina.tools.recall (recall_ring, recall_nearest); `lm_batches` and `lm_eval_batches` cut them into
(B, T) windows. Images: `load_images` gives normalized image datasets for CIFAR-10/100, Fashion-MNIST or any
ImageFolder tree. Files are looked for under `data_root()` (the generated recall task needs none):

    <root>/tinyshakespeare/input.txt
    <root>/wikitext-2/wiki.{train,valid,test}.tokens      (wikitext-103/ for WikiText-103)
    <root>/cifar10/{train,test}/<class>/*.png              (an ImageFolder subset) or cifar10/cifar-10-batches-py/
    <root>/cifar100/cifar-100-python/
    <root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
"""
import array
import dataclasses
import gzip
import hashlib
import os
import pathlib
import tempfile
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .corpus import TextCorpus
from .recall import recall_corpus


class TextFiles(NamedTuple):
    """A corpus read from files: <root>/<folder>/<files>, fetched from the archive URLs (mirrors) with this md5."""

    folder: str
    files: tuple
    urls: tuple
    md5: str


class GeneratedText(NamedTuple):
    """A corpus drawn from a seed by minina.tools.recall.recall_corpus(relation): no files."""

    relation: str


TEXT_DATASETS = {
    "tinyshakespeare": TextFiles("tinyshakespeare", ("input.txt",),
                                 ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
                                  "input.txt",),
                                 "6fb458f1232090904fb40fe944165e91"),
    "wikitext2": TextFiles("wikitext-2", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
                           ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                            "https://wikitext.smerity.com/wikitext-2-v1.zip"),
                           "542ccefacc6c27f945fb54453812b3cd"),
    "wikitext103": TextFiles("wikitext-103", ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
                             ("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
                              "https://wikitext.smerity.com/wikitext-103-v1.zip"),
                             "9ddaacaf6af0710eda8c456decff7832"),
    "recall_ring": GeneratedText("ring"),
    "recall_nearest": GeneratedText("nearest"),
}
IMAGE_DATASETS = ("cifar10", "cifar100", "fashion-mnist")
FASHION_MNIST_FILES = {  # file: md5 (the upstream gzip files, as torchvision checks them)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                         "https://ossci-datasets.s3.amazonaws.com/fashion-mnist/")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def cache_dir():
    """minina's user cache folder: $XDG_CACHE_HOME/minina, else ~/.cache/minina."""
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "minina"


def data_root(root=None):
    """Where datasets live: `root` if given, else $MININA_DATA, else the user cache folder."""
    if root is not None:
        return pathlib.Path(root).expanduser()
    if os.environ.get("MININA_DATA"):
        return pathlib.Path(os.environ["MININA_DATA"]).expanduser()
    return cache_dir()


def atomic_save(obj, path):
    """torch.save to a temporary file next to `path`, then rename: a reader never sees a half-written file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
        os.chmod(temporary, 0o644)  # mkstemp creates 0o600
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _missing_files_error(name, folder, missing, how):
    return FileNotFoundError(
        f"{name}: {', '.join(missing)} not found in {folder}. Put {how} in that folder, or point MININA_DATA "
        f"(or root=) at the folder that holds '{folder.name}/', or pass download=True (--download) to fetch it.")


def _download(name, folder, urls, md5):
    """Fetch one file, or an archive unpacked into folder.parent, trying each mirror; torchvision checks the md5."""
    from torchvision.datasets.utils import download_and_extract_archive, download_url

    errors = []
    for url in urls:
        try:
            if url.endswith(".zip"):
                download_and_extract_archive(url, download_root=str(folder.parent), md5=md5, remove_finished=True)
            else:
                download_url(url, str(folder), md5=md5)
            return
        except Exception as error:  # a dead mirror: try the next one
            errors.append(f"{url}: {error}")
    raise RuntimeError(f"could not download {name}:\n" + "\n".join(errors))


# ---------------------------------------------------------------------------------------------------------- text


def _word_ids(path, index, grow):
    """Ids of each line's words plus "<eos>" (as PyTorch's word_language_model reads WikiText), streamed so that
    WikiText-103 fits in memory; grow=True adds new words to index, else they become "<unk>"."""
    ids = array.array("q")
    unk = index.get("<unk>")
    with open(path, encoding="utf-8") as file:
        for line in file:
            words = line.split() + ["<eos>"]
            ids.extend([index.setdefault(word, len(index)) for word in words] if grow
                       else [index.get(word, unk) for word in words])
    return torch.frombuffer(ids, dtype=torch.long).clone()


def load_text(name, root=None, download=False):
    """Load a text corpus by name ("tinyshakespeare", "wikitext2", "wikitext103") as a TextCorpus.

    tinyshakespeare: characters, the first 90% of the file for training and the rest for val (test = val).
    wikitext: words, vocabulary from the train split in order of first appearance.
    recall_ring, recall_nearest: the synthetic recall task of minina.tools.recall.recall_corpus, generated (no files).
    """
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; choose one of {sorted(TEXT_DATASETS)}")
    if isinstance(TEXT_DATASETS[name], GeneratedText):
        return recall_corpus(TEXT_DATASETS[name].relation)
    folder_name, files, urls, md5 = TEXT_DATASETS[name]
    folder = data_root(root) / folder_name
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and download:
        _download(name, folder, urls, md5)
        missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise _missing_files_error(name, folder, missing, " and ".join(files))
    if name == "tinyshakespeare":
        text = (folder / "input.txt").read_text(encoding="utf-8")
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([index[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(ids))
        return TextCorpus(name, "char", vocab, ids[:split], ids[split:], ids[split:])
    index = {}
    train = _word_ids(folder / files[0], index, grow=True)  # the vocabulary in order of first appearance
    val, test = (_word_ids(folder / f, index, grow=False) for f in files[1:])
    return TextCorpus(name, "word", list(index), train, val, test)


def _check_tokens(tokens, seq_len):
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise ValueError(f"tokens must be a 1-D torch.long tensor, got {getattr(tokens, 'dtype', type(tokens))} "
                         f"{tuple(getattr(tokens, 'shape', ()))}")
    if len(tokens) <= seq_len:
        raise ValueError(f"tokens ({len(tokens)}) must be longer than seq_len ({seq_len})")


def lm_batches(tokens, batch_size, seq_len, generator=None):
    """One training batch of random windows: x (B, T) and targets y (B, T), y shifted one token ahead of x.

    The start positions are drawn with `generator`, so a seeded generator gives the same batches every run.
    """
    _check_tokens(tokens, seq_len)
    starts = torch.randint(len(tokens) - seq_len, (batch_size,), generator=generator)  # (B,)
    positions = starts[:, None] + torch.arange(seq_len)  # (B, T)
    return tokens[positions], tokens[positions + 1]


def lm_eval_batches(tokens, batch_size, seq_len, max_batches=None):
    """Consecutive non-overlapping windows from the start of tokens, as (x, y) batches of up to batch_size rows.

    Deterministic; stops after max_batches batches (None: all windows). The last batch may have fewer rows.
    """
    _check_tokens(tokens, seq_len)
    windows = (len(tokens) - 1) // seq_len
    starts = torch.arange(windows) * seq_len  # (windows,)
    for batch_number, first in enumerate(range(0, windows, batch_size)):
        if max_batches is not None and batch_number >= max_batches:
            return
        positions = starts[first:first + batch_size, None] + torch.arange(seq_len)  # (B, T)
        yield tokens[positions], tokens[positions + 1]


# -------------------------------------------------------------------------------------------------------- images


class ImageTensors(torch.utils.data.Dataset):
    """Images kept as one uint8 tensor (N, C, H, W) with labels (N,); item i is (normalized float (C, H, W), label).

    normalize() applies the same per-channel standardization to a whole uint8 batch, on any device.
    """

    def __init__(self, images, labels, mean, std):
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.normalize(self.images[i]), int(self.labels[i])

    def normalize(self, images):
        """uint8 (..., C, H, W) -> float32 (..., C, H, W) with zero mean and unit std per channel (train statistics)."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


@dataclasses.dataclass
class ImageData:
    """A train and a test ImageTensors dataset with what a model needs to know about them."""

    name: str
    train: ImageTensors
    test: ImageTensors
    classes: list
    channels: int
    image_size: int

    @property
    def num_classes(self):
        return len(self.classes)


def _folder_fingerprint(folder):
    """A short hash naming the contents of an image folder: its MANIFEST.sha256 if present, else names and sizes."""
    manifest = folder / "MANIFEST.sha256"
    digest = hashlib.sha256(str(folder.resolve()).encode())
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    else:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(folder)} {path.stat().st_size} {path.stat().st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _read_image(path):
    """One image file as uint8 (C, H, W): grayscale stays one channel, every other mode becomes RGB."""
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image if image.mode in ("L", "RGB") else image.convert("RGB")))
    return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)  # (C, H, W)


def _decode_image_folder(folder):
    """Read folder/{train,test}/<class>/* (ImageFolder layout, classes sorted by name) into uint8 tensors."""
    classes = sorted(p.name for p in (folder / "train").iterdir() if p.is_dir())
    arrays = {"classes": classes}
    for split in ("train", "test"):
        split_classes = sorted(p.name for p in (folder / split).iterdir() if p.is_dir())
        if set(split_classes) - set(classes):
            raise ValueError(f"{folder / split} has classes not in {folder / 'train'}: "
                             f"{sorted(set(split_classes) - set(classes))}")
        files = [(path, classes.index(name)) for name in split_classes
                 for path in sorted((folder / split / name).iterdir()) if path.is_file()]
        if not files:
            raise FileNotFoundError(f"no image files under {folder / split}/<class>/")
        images = [_read_image(path) for path, _ in files]  # (C, H, W) each
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"images under {folder / split} differ in shape: {sorted(shapes)}")
        arrays[f"{split}_images"] = torch.stack(images)  # (N, C, H, W)
        arrays[f"{split}_labels"] = torch.tensor([label for _, label in files], dtype=torch.long)
    return arrays


def _image_folder_arrays(folder):
    """The decoded ImageFolder tree, cached in the user cache folder under a hash of its path and MANIFEST."""
    cache = cache_dir() / "images" / f"{folder.name}-{_folder_fingerprint(folder)}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    arrays = _decode_image_folder(folder)
    atomic_save(arrays, cache)
    return arrays


def _read_idx(path, offset):
    with gzip.open(path, "rb") as file:
        return np.frombuffer(file.read(), np.uint8, offset=offset)


def _fashion_mnist_arrays(folder, download):
    """The four IDX .gz files, read directly (torchvision would want them decompressed in another layout)."""
    missing = [f for f in FASHION_MNIST_FILES if not (folder / f).is_file()]
    if download:
        for file in missing:
            _download("fashion-mnist", folder, [mirror + file for mirror in FASHION_MNIST_MIRRORS],
                      FASHION_MNIST_FILES[file])
        missing = [f for f in FASHION_MNIST_FILES if not (folder / f).is_file()]
    if missing:
        raise _missing_files_error("fashion-mnist", folder, missing, "the four .gz files of Fashion-MNIST (flat)")
    arrays = {"classes": list(FASHION_MNIST_CLASSES)}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", offset=16).reshape(-1, 1, 28, 28)
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", offset=8)
        arrays[f"{split}_images"] = torch.from_numpy(images.copy())  # (N, 1, 28, 28)
        arrays[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return arrays


def _cifar_arrays(name, folder, download):
    """Full CIFAR through torchvision if its files are in folder (or download), else an ImageFolder subset there."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_class = CIFAR10 if name == "cifar10" else CIFAR100
    has_batches = (folder / dataset_class.base_folder).is_dir()
    if not has_batches and (folder / "train").is_dir() and (folder / "test").is_dir():
        return _image_folder_arrays(folder)
    if not has_batches and not download:
        raise _missing_files_error(name, folder, [dataset_class.base_folder + "/"],
                                   f"torchvision's {dataset_class.base_folder}/ (from {dataset_class.filename}) or "
                                   f"an ImageFolder tree train/<class>/*.png, test/<class>/*.png")
    arrays = {}
    for split in ("train", "test"):
        dataset = dataset_class(str(folder), train=split == "train", download=download)
        arrays[f"{split}_images"] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
        arrays[f"{split}_labels"] = torch.tensor(dataset.targets, dtype=torch.long)
        arrays["classes"] = list(dataset.classes)
    return arrays


def load_images(name, root=None, download=False, train_size=None):
    """Load "cifar10", "cifar100", "fashion-mnist", or a path to an ImageFolder tree, as ImageData.

    Images are standardized per channel with the training set's mean and std. train_size keeps that many training
    images, chosen by a fixed random permutation (the same subset on every call).
    """
    if name in IMAGE_DATASETS:
        folder = data_root(root) / name
        arrays = (_fashion_mnist_arrays(folder, download) if name == "fashion-mnist"
                  else _cifar_arrays(name, folder, download))
    elif pathlib.Path(name).expanduser().is_dir():
        folder = pathlib.Path(name).expanduser()
        if not (folder / "train").is_dir() or not (folder / "test").is_dir():
            raise FileNotFoundError(f"{folder} must hold train/<class>/* and test/<class>/* (ImageFolder layout)")
        arrays = _image_folder_arrays(folder)
    else:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS} or give the path of an "
                         f"ImageFolder tree")
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    if train_size is not None:
        if not isinstance(train_size, int) or not 0 < train_size <= len(train_labels):
            raise ValueError(f"train_size must be an int in [1, {len(train_labels)}], got {train_size!r}")
        keep = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))[:train_size]
        train_images, train_labels = train_images[keep], train_labels[keep]
    pixels = train_images.transpose(0, 1).flatten(1).float() / 255  # (C, N*H*W)
    mean, std = pixels.mean(dim=1), pixels.std(dim=1)  # (C,)
    channels, height, width = train_images.shape[1:]
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    return ImageData(str(name), ImageTensors(train_images, train_labels, mean, std),
                     ImageTensors(arrays["test_images"], arrays["test_labels"], mean, std),
                     list(arrays["classes"]), channels, height)
