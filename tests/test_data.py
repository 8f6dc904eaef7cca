"""minina.tools.data against independent readings of the files in $MININA_DATA (CI: ../shared/data), and its errors."""
import gzip
import os
import pathlib
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from minina.tools import data
from minina.tools.data import (atomic_save, data_root, lm_batches, lm_eval_batches, load_images, load_text)

DATA = os.environ.get("MININA_DATA")
needs_data = pytest.mark.skipif(not DATA or not pathlib.Path(DATA, "tinyshakespeare").is_dir(),
                                reason="real datasets not found: export MININA_DATA=<folder with tinyshakespeare/, "
                                       "wikitext-2/, cifar10/, fashion-mnist/> (CI uses ../shared/data)")


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
    """A private cache folder for decoded images, for the whole module."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield pathlib.Path(os.environ["XDG_CACHE_HOME"])
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="module")
def cifar(image_cache):
    return load_images("cifar10")


# ------------------------------------------------------------------------------------------------------ roots


def test_data_root_prefers_argument_then_environment_then_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MININA_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("MININA_DATA")
    assert data_root() == tmp_path / "xdg" / "minina"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_root() == pathlib.Path.home() / ".cache" / "minina"


def test_atomic_save_replaces_whole_files_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    atomic_save({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    with pytest.raises(Exception):
        atomic_save({"a": lambda: 0}, path)  # cannot be pickled: the old file must survive
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


# ------------------------------------------------------------------------------------------------------- text


@needs_data
def test_tinyshakespeare_is_the_file_split_90_10_at_character_level():
    text = pathlib.Path(DATA, "tinyshakespeare", "input.txt").read_text(encoding="utf-8")
    corpus = load_text("tinyshakespeare")
    split = int(0.9 * len(text))
    assert corpus.level == "char" and corpus.vocab == sorted(set(text))
    assert corpus.decode(corpus.train) == text[:split] and corpus.decode(corpus.val) == text[split:]
    assert torch.equal(corpus.test, corpus.val) and corpus.train.dtype == torch.long
    assert torch.equal(corpus.encode(text[:100]), corpus.train[:100])
    with pytest.raises(ValueError, match="outside the tinyshakespeare vocabulary"):
        corpus.encode("naïve")


@needs_data
def test_wikitext2_is_word_level_with_one_eos_per_line():
    corpus = load_text("wikitext2")
    for split, ids in (("train", corpus.train), ("valid", corpus.val), ("test", corpus.test)):
        lines = pathlib.Path(DATA, "wikitext-2", f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines()
        assert len(ids) == sum(len(line.split()) + 1 for line in lines)
        head = [w for line in lines[:50] for w in line.split() + ["<eos>"]]
        assert corpus.decode(ids[:len(head)]) == " ".join(head)
    train_words = {w for line in open(pathlib.Path(DATA, "wikitext-2", "wiki.train.tokens"), encoding="utf-8")
                   for w in line.split()}
    assert set(corpus.vocab) == train_words | {"<eos>"} and len(corpus.vocab) == len(set(corpus.vocab))
    assert corpus.decode(corpus.encode("the cat zzqqxx")) == "the cat <unk>"


def test_unknown_text_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown text dataset 'ptb'.*tinyshakespeare"):
        load_text("ptb")


def test_missing_text_files_name_the_folder_and_mininadata(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_text("wikitext2", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "wikitext-2") in message and "wiki.train.tokens" in message and "MININA_DATA" in message


def test_lm_batches_are_seeded_windows_with_shifted_targets():
    tokens = torch.arange(1000, dtype=torch.long) * 7 % 1009  # distinct values: a window's start is recoverable
    x, y = lm_batches(tokens, 6, 16, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (6, 16)
    for row_x, row_y in zip(x, y):
        start = int((tokens == row_x[0]).nonzero())
        assert torch.equal(row_x, tokens[start:start + 16]) and torch.equal(row_y, tokens[start + 1:start + 17])
    again, _ = lm_batches(tokens, 6, 16, torch.Generator().manual_seed(3))
    other, _ = lm_batches(tokens, 6, 16, torch.Generator().manual_seed(4))
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_lm_eval_batches_walk_the_split_in_order():
    tokens = torch.arange(103, dtype=torch.long)
    batches = list(lm_eval_batches(tokens, 4, 10))
    assert [len(x) for x, _ in batches] == [4, 4, 2]  # (103 - 1) // 10 = 10 windows
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert torch.equal(x.flatten(), tokens[:100]) and torch.equal(y.flatten(), tokens[1:101])
    assert len(list(lm_eval_batches(tokens, 4, 10, max_batches=2))) == 2


@pytest.mark.parametrize("tokens, seq_len, match", [
    (torch.zeros(2, 50, dtype=torch.long), 8, "1-D torch.long"),
    (torch.zeros(50), 8, "1-D torch.long"),
    (torch.zeros(8, dtype=torch.long), 8, "longer than seq_len"),
])
def test_lm_batch_errors(tokens, seq_len, match):
    with pytest.raises(ValueError, match=match):
        lm_batches(tokens, 2, seq_len)
    with pytest.raises(ValueError, match=match):
        next(lm_eval_batches(tokens, 2, seq_len))


# ----------------------------------------------------------------------------------------------------- images


@needs_data
def test_cifar10_subset_matches_the_png_files(cifar, image_cache):
    folder = pathlib.Path(DATA, "cifar10")
    assert (len(cifar.train), len(cifar.test), cifar.num_classes, cifar.channels, cifar.image_size) == \
        (10_000, 2_000, 10, 3, 32)
    assert cifar.classes == sorted(p.name for p in (folder / "train").iterdir())
    for dataset, split in ((cifar.train, "train"), (cifar.test, "test")):
        last_class = cifar.classes[-1]
        last_file = sorted((folder / split / last_class).iterdir())[-1]
        pixels = torch.from_numpy(np.array(Image.open(last_file).convert("RGB"))).permute(2, 0, 1)  # (3, 32, 32)
        image, label = dataset[len(dataset) - 1]
        assert label == cifar.num_classes - 1
        expected = (pixels.float() / 255 - cifar.train.mean[:, None, None]) / cifar.train.std[:, None, None]
        torch.testing.assert_close(image, expected)
    normalized = cifar.train.normalize(cifar.train.images)  # (N, 3, 32, 32)
    torch.testing.assert_close(normalized.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert len(list((image_cache / "minina" / "images").glob("cifar10-*.pt"))) == 1
    by_path = load_images(str(folder))  # the same tree given as a path: served from the same cache
    assert torch.equal(by_path.train.images, cifar.train.images) and by_path.classes == cifar.classes


@needs_data
def test_train_size_keeps_a_fixed_random_subset(cifar):
    subset = load_images("cifar10", train_size=500)
    assert len(subset.train) == 500 and len(subset.test) == len(cifar.test)
    assert torch.equal(subset.train.labels, load_images("cifar10", train_size=500).train.labels)
    assert len(subset.train.labels.unique()) == cifar.num_classes  # shuffled, not the first class only
    with pytest.raises(ValueError, match="train_size must be an int in"):
        load_images("cifar10", train_size=0)


@needs_data
def test_fashion_mnist_matches_an_independent_idx_reading():
    fashion = load_images("fashion-mnist")
    assert (len(fashion.train), len(fashion.test), fashion.channels, fashion.image_size) == (60_000, 10_000, 1, 28)
    with gzip.open(pathlib.Path(DATA, "fashion-mnist", "t10k-images-idx3-ubyte.gz")) as file:
        magic, count, rows, cols = struct.unpack(">IIII", file.read(16))
        first = torch.tensor(list(file.read(rows * cols)), dtype=torch.uint8).view(1, rows, cols)
    assert (magic, count) == (2051, len(fashion.test))
    assert torch.equal(fashion.test.images[0], first)
    assert torch.bincount(fashion.train.labels).tolist() == [len(fashion.train) // 10] * 10


def _write_tree(root, shapes):
    """A tiny ImageFolder tree: {(split, class): [(H, W), ...]} -> PNG files."""
    for (split, name), sizes in shapes.items():
        (root / split / name).mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            pixels = np.full((height, width, 3), 40 * i + (name == "b") * 100, np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_any_image_folder_tree_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_tree(tmp_path / "tree", {("train", "a"): [(8, 8)] * 3, ("train", "b"): [(8, 8)] * 2,
                                    ("test", "b"): [(8, 8)]})
    images = load_images(str(tmp_path / "tree"))
    assert images.classes == ["a", "b"] and (len(images.train), len(images.test)) == (5, 1)
    assert images.train.labels.tolist() == [0, 0, 0, 1, 1] and images.test.labels.tolist() == [1]
    assert int(images.train.images[1, 0, 0, 0]) == 40 and int(images.test.images[0, 0, 0, 0]) == 100


def test_image_folder_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_tree(tmp_path / "mixed", {("train", "a"): [(8, 8), (9, 9)], ("test", "a"): [(8, 8)]})
    with pytest.raises(ValueError, match="differ in shape"):
        load_images(str(tmp_path / "mixed"))
    _write_tree(tmp_path / "extra", {("train", "a"): [(8, 8)], ("test", "z"): [(8, 8)]})
    with pytest.raises(ValueError, match="classes not in"):
        load_images(str(tmp_path / "extra"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="ImageFolder layout"):
        load_images(str(tmp_path / "flat"))


def test_unknown_image_dataset_is_refused():
    with pytest.raises(ValueError, match="unknown image dataset 'mnist'"):
        load_images("mnist")


@pytest.mark.parametrize("name, expected", [("cifar100", "cifar-100-python"),
                                            ("fashion-mnist", "train-images-idx3-ubyte.gz")])
def test_missing_image_files_name_the_folder_and_mininadata(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError) as error:
        load_images(name, root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / name) in message and expected in message and "MININA_DATA" in message


def test_downloads_try_every_mirror_then_say_which_failed(tmp_path, monkeypatch):
    import torchvision.datasets.utils as utils

    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise OSError("offline")

    monkeypatch.setattr(utils, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match="could not download wikitext2") as error:
        load_text("wikitext2", root=tmp_path, download=True)
    assert tried == list(data.TEXT_DATASETS["wikitext2"][2]) and all(url in str(error.value) for url in tried)
