"""minina.train: exact resume (paused, Ctrl-C), safe checkpoints, metrics checked by hand, DDP under torchrun, CLI."""
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import minina.train as train_module
from minina.__main__ import main as cli
from minina.data import lm_eval_batches, load_images, load_text
from minina.train import CONFIGS, TrainConfig, build_model, check_config, learning_rate_factor, train

DATA = os.environ.get("MININA_DATA")
needs_data = pytest.mark.skipif(not DATA or not pathlib.Path(DATA, "tinyshakespeare").is_dir(),
                                reason="real datasets not found: export MININA_DATA=<folder with tinyshakespeare/ "
                                       "and cifar10/> (CI uses ../shared/data)")
LOSS_COLUMNS = slice(0, 5)  # step, train_loss, val_loss, perplexity or accuracy, lr (not the timing)


@pytest.fixture(autouse=True, scope="module")
def one_thread(tmp_path_factory):
    """Tiny models run fastest on one thread, and the 2-core CI machine is shared; decoded images go to tmp."""
    threads, cache = torch.get_num_threads(), os.environ.get("XDG_CACHE_HOME")
    torch.set_num_threads(1)
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(threads)
    os.environ.pop("XDG_CACHE_HOME") if cache is None else os.environ.update(XDG_CACHE_HOME=cache)


def tiny_lm(out, **changes):
    return TrainConfig(**{**dict(task="lm", dataset="tinyshakespeare", attention="hybrid", dim=32, depth=2, heads=2,
                                 seq_len=32, batch_size=8, max_steps=40, lr=3e-3, warmup_steps=5, eval_every=10,
                                 eval_batches=4, out=str(out)), **changes})


def tiny_vit(out, **changes):
    return TrainConfig(**{**dict(task="vit", dataset="cifar10", attention="hybrid", dim=32, depth=2, heads=2,
                                 patch_size=8, batch_size=16, train_size=64, max_steps=12, lr=3e-3, warmup_steps=2,
                                 eval_every=3, eval_batches=2, out=str(out)), **changes})


def rows(out):
    with open(pathlib.Path(out, "metrics.csv"), newline="") as file:
        return list(csv.reader(file))


def loss_rows(out):
    return [row[LOSS_COLUMNS] for row in rows(out)]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """The uninterrupted 40-step reference run."""
    out = tmp_path_factory.mktemp("lm-40")
    return train(tiny_lm(out), progress=False), out


# ---------------------------------------------------------------------------------------------------- resume


@needs_data
def test_paused_run_resumed_equals_uninterrupted_run(lm_run, tmp_path):
    summary, out = lm_run
    paused = train(tiny_lm(tmp_path), stop_after=20, progress=False)
    assert paused["steps"] == 20 and paused["stopped_early"] and not paused["interrupted"]
    assert len(rows(tmp_path)) == 1 + 2
    resumed = train(tiny_lm(tmp_path), resume=True, progress=False)
    assert loss_rows(tmp_path) == loss_rows(out) and len(rows(out)) == 1 + 4
    assert (resumed["val_loss"], resumed["train_loss"], resumed["steps"]) == \
        (summary["val_loss"], summary["train_loss"], 40)
    final = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    again = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(final[name], again[name]) for name in final)


@needs_data
def test_ctrl_c_saves_at_a_step_boundary_and_resumes_exactly(lm_run, tmp_path, monkeypatch):
    """SIGINT in the middle of step 13 (mid-interval): the step finishes, a checkpoint is saved, the run stops."""
    _, out = lm_run
    calls = []
    original = train_module.lm_batches

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "lm_batches", interrupting)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    stopped = train(tiny_lm(tmp_path), progress=False)
    assert stopped["interrupted"] and stopped["steps"] == 13
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 13
    assert handlers == {number: signal.getsignal(number) for number in handlers}  # handlers restored
    monkeypatch.setattr(train_module, "lm_batches", original)
    train(tiny_lm(tmp_path), resume=True, progress=False)
    assert loss_rows(tmp_path) == loss_rows(out)


@needs_data
def test_vit_resume_across_epochs_is_exact(tmp_path):
    """64 images in batches of 16: epochs end every 4 steps; pause mid-epoch at step 6."""
    full = train(tiny_vit(tmp_path / "full"), progress=False)
    train(tiny_vit(tmp_path / "paused"), stop_after=6, progress=False)
    resumed = train(tiny_vit(tmp_path / "paused"), resume=True, progress=False)
    assert loss_rows(tmp_path / "paused") == loss_rows(tmp_path / "full")
    assert resumed["accuracy"] == full["accuracy"]


@needs_data
def test_checkpoint_is_weights_only_safe_and_config_json_is_the_config(lm_run):
    _, out = lm_run
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 40 and set(checkpoint) >= {"model", "optimizer", "scheduler", "rng", "data"}
    assert checkpoint["data"]["generator"].dtype == torch.uint8
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(tiny_lm(out))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.csv"]


@needs_data
def test_resume_errors(lm_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(tiny_lm(tmp_path), resume=True, progress=False)
    _, out = lm_run
    with pytest.raises(ValueError, match=r"cannot resume.*dim: checkpoint 32, now 64"):
        train(tiny_lm(out, dim=64), resume=True, progress=False)
    with pytest.raises(ValueError, match="stop_after must be a positive int"):
        train(tiny_lm(tmp_path), stop_after=0, progress=False)


# --------------------------------------------------------------------------------------------------- metrics


@needs_data
def test_lm_metrics_match_a_hand_evaluation_of_the_checkpoint(lm_run):
    summary, out = lm_run
    header, *body = rows(out)
    assert header == ["step", "train_loss", "val_loss", "perplexity", "lr", "tokens_per_s"]
    assert [int(row[0]) for row in body] == [10, 20, 30, 40]
    assert float(body[-1][2]) == pytest.approx(summary["val_loss"], rel=1e-6)
    config = tiny_lm(out)
    corpus = load_text("tinyshakespeare")
    model = build_model(config, vocab_size=corpus.vocab_size)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
                  for x, y in lm_eval_batches(corpus.val, config.batch_size, config.seq_len, config.eval_batches)]
    val_loss = float(sum(losses)) / (config.eval_batches * config.batch_size * config.seq_len)
    assert summary["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-5)
    assert summary["val_loss"] < math.log(corpus.vocab_size)  # it learned something
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    lrs = [float(row[4]) for row in body]
    assert lrs == pytest.approx([config.lr * learning_rate_factor(s - 1, 5, 40) for s in (10, 20, 30, 40)], rel=1e-5)


@needs_data
def test_vit_accuracy_matches_a_hand_evaluation(tmp_path):
    """With image_size=16 the loop resizes the 32x32 images first; the hand evaluation does it too."""
    config = tiny_vit(tmp_path, max_steps=3, eval_every=3, image_size=16)
    summary = train(config, progress=False)
    assert rows(tmp_path)[0] == ["step", "train_loss", "val_loss", "accuracy", "lr", "images_per_s"]
    images = load_images("cifar10", train_size=64)
    model = build_model(config, num_classes=10, image_size=32, channels=3)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    test = images.test
    count = config.eval_batches * config.batch_size
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:count]  # fixed, all classes
    with torch.no_grad():
        images = torch.stack([test[i][0] for i in chosen.tolist()])  # (count, 3, 32, 32)
        logits = model(F.interpolate(images, size=16, mode="bilinear", align_corners=False))  # (count, 10)
    labels = test.labels[chosen]
    assert len(labels.unique()) == 10
    assert summary["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert summary["val_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_learning_rate_warms_up_then_decays_by_cosine():
    factors = [learning_rate_factor(step, 10, 110) for step in range(111)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert learning_rate_factor(500, 10, 110) == pytest.approx(0.1)  # past the horizon: stays at the floor


# ----------------------------------------------------------------------------------------- models and configs


def test_build_model_sets_the_neural_score_of_hybrid_models_only():
    config = TrainConfig(dim=64, depth=3, heads=2, seq_len=16, proj_dim=4, score_options={"activation": "gelu"})
    model = build_model(config, vocab_size=11)
    kinds = [block.attn.kind for block in model.blocks]
    assert kinds == ["neural", "dot", "dot"]
    score = model.blocks[0].attn.score
    assert (score.head_dim, score.proj_dim, score.activation) == (32, 4, "gelu")
    assert not any(hasattr(block.attn, "score") for block in model.blocks[1:])
    vit = build_model(dataclasses.replace(config, task="vit", dataset="cifar10", image_size=16, patch_size=4),
                      num_classes=7, image_size=32, channels=1)
    assert vit(torch.randn(2, 1, 16, 16)).shape == (2, 7)  # config.image_size overrides the data's size
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_model(config)
    with pytest.raises(ValueError, match="needs num_classes, image_size and channels"):
        build_model(dataclasses.replace(config, task="vit", dataset="cifar10"), num_classes=10)


def test_named_configs_are_the_papers_settings():
    lm, vit = CONFIGS["paper-lm"], CONFIGS["paper-vit"]
    assert (lm.dataset, lm.dim, lm.depth, lm.heads, lm.seq_len, lm.attention, lm.proj_dim) == \
        ("wikitext103", 512, 8, 8, 1024, "hybrid", 2)
    assert (vit.dataset, vit.dim, vit.depth, vit.attention, vit.image_size // vit.patch_size) == \
        ("cifar10", 768, 12, "hybrid", 28)
    for config in CONFIGS.values():
        check_config(config)


@pytest.mark.parametrize("change, match", [
    (dict(task="seq2seq"), "task must be one of"),
    (dict(attention="linear"), "attention must be one of"),
    (dict(dataset="cifar10"), "dataset for task 'lm' must be one of"),
    (dict(task="vit", dataset="tinyshakespeare"), "dataset for task 'vit' must be one of"),
    (dict(dim=0), "dim must be a positive int"),
    (dict(batch_size=2.5), "batch_size must be a positive int"),
    (dict(eval_batches=0), "eval_batches must be a positive int or None"),
    (dict(dim=30, heads=4), r"dim \(30\) must be divisible by heads \(4\)"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(score_options="gelu"), "score_options must be a dict or None"),
    (dict(backend="flash"), "backend must be one of"),
    (dict(device="tpu9"), "device must be 'auto' or a torch device"),
])
def test_bad_config_values_are_refused(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(out=str(tmp_path), **change), progress=False)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        check_config({"task": "lm"})


def test_default_out_names_the_run():
    assert TrainConfig(task="vit", dataset="/data/trees/pets", attention="dot", seed=3).out == \
        "runs/vit-pets-dot-seed3"


# ------------------------------------------------------------------------------------------ processes and CLI


def run_cli(*args, env=None, cwd=None):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=environment,
                          cwd=cwd)


@needs_data
def test_torchrun_with_two_cpu_processes_equals_one_process(lm_run, tmp_path):
    """The global batch is split over the processes, so gloo DDP reproduces the single-process run."""
    _, out = lm_run
    flags = ["--dim", "32", "--depth", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8", "--lr", "3e-3",
             "--max-steps", "40", "--warmup-steps", "5", "--eval-every", "10", "--eval-batches", "4"]
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     "-m", "minina", "train", *flags, "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 40: val_loss" in result.stdout and result.stdout.count("step 40: val_loss") == 1  # rank 0 only
    for distributed, single in zip(rows(tmp_path)[1:], rows(out)[1:]):
        assert int(distributed[0]) == int(single[0])
        assert [float(v) for v in distributed[1:5]] == pytest.approx([float(v) for v in single[1:5]], rel=1e-4)


@needs_data
def test_cli_pauses_resumes_and_prints_a_summary(lm_run, tmp_path, capsys):
    _, out = lm_run
    flags = ["train", "--dim", "32", "--depth", "2", "--heads", "2", "--seq-len", "32", "--batch-size", "8",
             "--lr", "3e-3", "--max-steps", "40", "--warmup-steps", "5", "--eval-every", "10", "--eval-batches", "4",
             "--out", str(tmp_path)]
    cli([*flags, "--stop-after", "20"])  # in this process: quicker
    assert "paused, continue with --resume; step 20" in capsys.readouterr().out
    resumed = run_cli("-m", "minina", *flags, "--resume")  # as a user runs it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1].startswith("step 40: val_loss")
    assert loss_rows(tmp_path) == loss_rows(out)


def test_cli_errors_are_one_line_messages(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as bad_json:
        cli(["train", "--score-options", "{init: kaiming}"])
    assert bad_json.value.code == 2 and "--score-options" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^error: dataset for task 'lm' must be one of"):
        cli(["train", "--dataset", "ptb", "--out", str(tmp_path)])
    monkeypatch.setenv("MININA_DATA", str(tmp_path))
    expected = "^error: tinyshakespeare: input.txt not found in " + re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=expected):
        cli(["train", "--out", str(tmp_path)])
