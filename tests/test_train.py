"""minina.tools.train: exact resume (paused, Ctrl-C), safe checkpoints, metrics checked by hand, optimizer groups,
gradient accumulation, precision choice, torch.compile, no per-step waits, DDP under torchrun, CLI."""
import argparse
import csv
import dataclasses
import inspect
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

import minina.scores
import minina.tools.train_flags as flags_module
import minina.tools.train as train_module
import minina.tools.train_tasks as tasks_module
from minina import NeuralScore
from minina.__main__ import main as cli
from minina.tools import candidates
from minina.tools.candidates import CandidateScore
from minina.tools.data import lm_eval_batches, load_images, load_text
from minina.tools.config import PAPER_CONFIGS, TrainConfig
from minina.tools.train import (ConfigError, autocast_dtype, build_model, check_config, learning_rate_factor,
                                make_optimizer, train)

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
    return TrainConfig(**{**dict(task="lm", dataset="tinyshakespeare", kind="hybrid", dim=32, depth=2, heads=2,
                                 seq_len=32, batch_size=8, max_steps=40, lr=3e-3, warmup_steps=5, eval_every=10,
                                 eval_batches=4, out=str(out)), **changes})


def tiny_vit(out, **changes):
    return TrainConfig(**{**dict(task="vit", dataset="cifar10", kind="hybrid", dim=32, depth=2, heads=2,
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
    original = tasks_module.lm_batches

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(tasks_module, "lm_batches", interrupting)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    stopped = train(tiny_lm(tmp_path), progress=False)
    assert stopped["interrupted"] and stopped["steps"] == 13
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 13
    assert handlers == {number: signal.getsignal(number) for number in handlers}  # handlers restored
    monkeypatch.setattr(tasks_module, "lm_batches", original)
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
    with pytest.raises(ValueError, match=r"cannot resume.*grad_accum: checkpoint 1, now 2"):
        train(tiny_lm(out, grad_accum=2), resume=True, progress=False)


@needs_data
def test_checkpoints_older_than_a_config_field_still_resume(tmp_path):
    """A checkpoint written before grad_accum, log_every, dtype and compile existed resumes with their defaults."""
    train(tiny_lm(tmp_path, max_steps=4, eval_every=2, eval_batches=1), stop_after=2, progress=False)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for name in ("grad_accum", "log_every", "dtype", "compile"):
        del checkpoint["config"][name]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert train(tiny_lm(tmp_path, max_steps=4, eval_every=2, eval_batches=1), resume=True, progress=False)["steps"] == 4


# --------------------------------------------------------------------------------------------------- metrics


@needs_data
def test_lm_metrics_match_a_hand_evaluation_of_the_checkpoint(lm_run):
    summary, out = lm_run
    header, *body = rows(out)
    assert header == ["step", "train_loss", "val_loss", "perplexity", "lr", "tokens_per_s", "peak_memory_mib"]
    assert all(float(row[5]) > 0 and row[6] == "" for row in body)  # peak memory is measured on CUDA only
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
    assert rows(tmp_path)[0] == ["step", "train_loss", "val_loss", "accuracy", "lr", "images_per_s", "peak_memory_mib"]
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
    """Paper text where it speaks (12 heads of 64 for the ViT, d' = head_dim / 32), the released scripts where it
    is silent (dropout 0.1, batch size 1, learning rates); the neural block gets d' = 2 in both."""
    lm, vit = PAPER_CONFIGS["paper-lm"], PAPER_CONFIGS["paper-vit"]
    assert (lm.dataset, lm.dim, lm.depth, lm.heads, lm.seq_len, lm.kind, lm.dropout, lm.batch_size, lm.lr) == \
        ("wikitext103", 512, 8, 8, 1024, "hybrid", 0.1, 1, 3e-4)
    assert (vit.dataset, vit.dim, vit.depth, vit.heads, vit.kind, vit.image_size // vit.patch_size,
            vit.dropout, vit.batch_size, vit.lr) == ("cifar10", 768, 12, 12, "hybrid", 28, 0.1, 1, 5e-5)
    for config in PAPER_CONFIGS.values():
        check_config(config)
        model = build_model(dataclasses.replace(config, depth=1), vocab_size=50, num_classes=10, image_size=224,
                            channels=3)
        assert model.blocks[0].attn.score.proj_dim == 2 and model.blocks[0].attn.head_dim == 64


@pytest.mark.parametrize("change, match", [
    (dict(task="seq2seq"), "task must be one of"),
    (dict(kind="linear"), "kind must be one of"),
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
    (dict(grad_accum=0), "grad_accum must be a positive int"),
    (dict(log_every=0), "log_every must be a positive int"),
    (dict(dtype="fp8"), "dtype must be one of"),
    (dict(compile="yes"), "compile must be a bool"),
])
def test_bad_config_values_are_refused(change, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(out=str(tmp_path), **change), progress=False)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        check_config({"task": "lm"})


def test_named_config_and_flag_overrides():
    """--config NAME starts from the named config, flags given with it override it (here: the released ViT script's
    8 heads, so d' = 3, on an fp16 GPU with accumulation)."""
    parser = argparse.ArgumentParser()
    train_module.add_arguments(parser)
    args = parser.parse_args(["--config", "paper-vit", "--heads", "8", "--proj-dim", "3", "--dtype", "fp16",
                              "--grad-accum", "4", "--log-every", "100", "--compile"])
    assert flags_module.config_from_args(args) == dataclasses.replace(
        PAPER_CONFIGS["paper-vit"], heads=8, proj_dim=3, dtype="fp16", grad_accum=4, log_every=100, compile=True)
    assert flags_module.config_from_args(parser.parse_args(["--config", "paper-lm"])) == PAPER_CONFIGS["paper-lm"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "fp8"])


def test_default_out_names_the_run():
    assert TrainConfig(task="vit", dataset="/data/trees/pets", kind="dot", seed=3).out == \
        "runs/vit-pets-dot-seed3"


# ------------------------------------------------------------------------------ optimizer, dtype, accumulation


def decay_groups(model, config=TrainConfig(weight_decay=0.1)):
    """{parameter name: its weight decay} of make_optimizer's groups."""
    optimizer = make_optimizer(model, config)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(decay) == len(list(model.parameters()))  # every parameter once
    return {name: decay[id(p)] for name, p in model.named_parameters()}


def test_optimizer_decays_linear_and_conv_weights_only():
    """By name: the weights of Linear (attention, MLP, score MLP, head) and Conv layers decay; biases, norms,
    embeddings (the LM's tied head with them), cls_token, pos_emb and a learned logit scale do not."""
    lm = build_model(TrainConfig(dim=64, depth=2, heads=2, seq_len=8), vocab_size=11)
    lm.blocks[0].attn.score = CandidateScore(32, learn_scale=True)  # the study's learned scale: a lone scalar
    decay = decay_groups(lm)
    decayed = {name for name, value in decay.items() if value == 0.1}
    linear = ["attn.to_q", "attn.to_kv", "attn.to_out", "mlp.0", "mlp.2"]
    score = ["attn.score.q_proj", "attn.score.k_proj", "attn.score.mlp.0", "attn.score.mlp.2", "attn.score.mlp.4"]
    assert decayed == {f"blocks.{i}.{layer}.weight" for i in (0, 1) for layer in linear} | \
        {f"blocks.0.{layer}.weight" for layer in score}
    assert set(decay) - decayed >= {"token_emb.weight", "pos_emb.weight", "blocks.0.attn.score.mlp.logit_scale",
                                    "blocks.0.attn.score.mlp.0.bias", "blocks.1.ln_attn.weight", "ln_out.bias"}
    assert lm.head.weight is lm.token_emb.weight and "head.weight" not in decay  # tied: one tensor, an embedding
    assert decay["token_emb.weight"] == 0.0
    vit = build_model(TrainConfig(task="vit", dataset="cifar10", dim=64, depth=2, heads=2, kind="neural"),
                      num_classes=10, image_size=8, channels=3)
    decay = decay_groups(vit)
    assert {name for name, value in decay.items() if value == 0.1} == \
        {f"blocks.{i}.{layer}.weight" for i in (0, 1) for layer in linear + score} | {"patch_emb.weight", "head.weight"}
    no_decay = ("cls_token", "pos_emb", "patch_emb.bias", "blocks.0.attn.score.mlp.4.bias", "blocks.1.ln_mlp.weight")
    assert all(decay[name] == 0.0 for name in no_decay)
    optimizer = make_optimizer(vit, TrainConfig())
    assert not optimizer.defaults["fused"] and optimizer.defaults["betas"] == (0.9, 0.95)  # fused on CUDA only


def test_optimizer_counts_a_bare_score_module():
    score = NeuralScore(64)
    decay = decay_groups(score)
    assert {name for name, value in decay.items() if value} == {"q_proj.weight", "k_proj.weight", "mlp.0.weight",
                                                                 "mlp.2.weight", "mlp.4.weight"}


@pytest.mark.parametrize("dtype, device, capability, expected", [
    ("auto", "cuda", (7, 5), torch.float16),   # T4: no bf16, fp16 with a gradient scaler
    ("auto", "cuda", (7, 0), torch.float16),   # V100
    ("auto", "cuda", (8, 0), torch.bfloat16),  # A100
    ("auto", "cuda", (9, 0), torch.bfloat16),  # H100
    ("auto", "cpu", None, torch.float32),
    ("fp16", "cuda", (7, 5), torch.float16),
    ("fp32", "cuda", (9, 0), torch.float32),
    ("bf16", "cpu", None, torch.bfloat16),
    ("bf16", "cuda", (8, 6), torch.bfloat16),
])
def test_autocast_dtype_choice(dtype, device, capability, expected):
    assert autocast_dtype(dtype, device, capability) == expected


def test_autocast_dtype_refuses_what_cannot_work():
    with pytest.raises(ValueError, match=r"'bf16' needs a GPU of compute capability 8.0 or more, this one has 7.5"):
        autocast_dtype("bf16", "cuda", (7, 5))
    with pytest.raises(ValueError, match="dtype must be one of"):
        autocast_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="needs the GPU's capability"):
        autocast_dtype("auto", "cuda")


def final_weights(out):
    return torch.load(pathlib.Path(out, "checkpoint.pt"), weights_only=True)["model"]


@needs_data
@pytest.mark.parametrize("task", ["lm", "vit"])
def test_grad_accum_equals_the_full_batch_and_resumes_exactly(task, tmp_path):
    """grad_accum=2 with half the batch takes the steps of the full batch (same data, same gradients, to float
    rounding; over two steps, as Adam's first steps, about lr * sign(gradient), would magnify a rounding difference
    on a near-zero gradient); paused after step 1 and resumed, it equals itself exactly."""
    tiny = {"lm": tiny_lm, "vit": tiny_vit}[task]
    settings = dict(max_steps=2, eval_every=1)
    full = train(tiny(tmp_path / "full", batch_size=8, eval_batches=2, **settings), progress=False)
    settings.update(eval_batches=4)  # evaluation batches have batch_size rows: the same 16 examples
    accumulated = train(tiny(tmp_path / "accum", batch_size=4, grad_accum=2, **settings), progress=False)
    for a, b in zip(rows(tmp_path / "full")[1:], rows(tmp_path / "accum")[1:], strict=True):
        assert a[0] == b[0] and [float(v) for v in a[1:5]] == pytest.approx([float(v) for v in b[1:5]], rel=1e-5)
    assert accumulated["val_loss"] == pytest.approx(full["val_loss"], rel=1e-5)
    weights, accumulated_weights = final_weights(tmp_path / "full"), final_weights(tmp_path / "accum")
    for name in weights:
        torch.testing.assert_close(accumulated_weights[name], weights[name], rtol=1e-4, atol=1e-6)
    train(tiny(tmp_path / "paused", batch_size=4, grad_accum=2, **settings), stop_after=1, progress=False)
    train(tiny(tmp_path / "paused", batch_size=4, grad_accum=2, **settings), resume=True, progress=False)
    assert loss_rows(tmp_path / "paused") == loss_rows(tmp_path / "accum")
    resumed = final_weights(tmp_path / "paused")
    assert all(torch.equal(resumed[name], accumulated_weights[name]) for name in resumed)


@needs_data
def test_the_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """Reading a number back (item, bool) makes the host wait for the GPU: minina's loop and models do it at
    evaluations and every log_every steps for the progress bar, never once per step. (PyTorch's AdamW reads its
    step counter, a CPU tensor, with item(); that is no wait.)"""
    package = pathlib.Path(train_module.__file__).parents[1]  # minina/: the core and the tools
    reads = []
    for method in ("item", "__bool__"):
        original = getattr(torch.Tensor, method)

        def counting(self, _original=original):
            caller = pathlib.Path(sys._getframe(1).f_code.co_filename)
            if package in caller.parents and caller.name != "data.py":  # data.py works on CPU tensors only
                reads.append(f"{caller.name}:{sys._getframe(1).f_lineno}")
            return _original(self)
        monkeypatch.setattr(torch.Tensor, method, counting)
    train(tiny_lm(tmp_path, max_steps=30, eval_every=30, eval_batches=1), progress=False)
    assert 0 < len(reads) <= 4, reads  # the evaluation and the checkpoint of step 30, not 30 steps' worth
    reads.clear()
    train(tiny_lm(tmp_path / "bar", max_steps=30, eval_every=30, eval_batches=1, log_every=10), progress=True)
    assert len(reads) <= 4 + 3, reads  # and the progress bar's loss at steps 10, 20, 30


@needs_data
def test_fp16_with_a_gradient_scaler_trains_and_resumes_exactly(tmp_path):
    """The T4/V100 path (dtype fp16 + GradScaler), run under CPU autocast: close to fp32, and its scaler state
    travels in the checkpoint so a resumed run equals an uninterrupted one."""
    settings = dict(max_steps=4, eval_every=2, eval_batches=1)
    fp32 = train(tiny_lm(tmp_path / "fp32", **settings), progress=False)
    fp16 = train(tiny_lm(tmp_path / "fp16", dtype="fp16", **settings), progress=False)
    assert fp16["val_loss"] == pytest.approx(fp32["val_loss"], rel=1e-2)
    scaler = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0 ** 16 and scaler["_growth_tracker"] == 4  # 4 steps without overflow
    train(tiny_lm(tmp_path / "paused", dtype="fp16", **settings), stop_after=3, progress=False)
    train(tiny_lm(tmp_path / "paused", dtype="fp16", **settings), resume=True, progress=False)
    assert loss_rows(tmp_path / "paused") == loss_rows(tmp_path / "fp16")


def compiler_works():
    try:
        return bool(torch.compile(lambda x: x * 2)(torch.ones(2)).sum() == 4)
    except Exception:  # no C++ compiler, unsupported Python: anything that stops inductor
        return False


@needs_data
@pytest.mark.skipif(not compiler_works(), reason="torch.compile does not work here")
def test_compile_trains_like_eager(tmp_path):
    settings = dict(kind="dot", depth=1, max_steps=3, eval_every=3, eval_batches=1)  # a short compile
    eager = train(tiny_lm(tmp_path / "eager", **settings), progress=False)
    compiled = train(tiny_lm(tmp_path / "compiled", compile=True, **settings), progress=False)
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert set(final_weights(tmp_path / "compiled")) == set(final_weights(tmp_path / "eager"))  # no _orig_mod.


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
    with pytest.raises(SystemExit) as bad_dataset:
        cli(["train", "--dataset", "ptb", "--out", str(tmp_path)])
    assert bad_dataset.value.code == 2
    assert "train: error: dataset for task 'lm' must be one of" in capsys.readouterr().err
    monkeypatch.setenv("MININA_DATA", str(tmp_path))
    expected = "^error: tinyshakespeare: input.txt not found in " + re.escape(str(tmp_path))
    with pytest.raises(SystemExit, match=expected):
        cli(["train", "--out", str(tmp_path)])


def test_the_cli_checks_the_config_once_in_train(tmp_path, monkeypatch, capsys):
    """`python -m minina train` builds the config and calls train(), which checks it once: no check before, none
    again when the model is built (a generated corpus, no data files needed)."""
    calls = {"check_config": 0, "check_device": 0}
    for name in calls:
        original = getattr(train_module, name)

        def counting(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(train_module, name, counting)
    cli(["train", "--dataset", "recall_ring", "--kind", "hybrid", "--dim", "16", "--depth", "1", "--heads", "2",
         "--seq-len", "8", "--batch-size", "2", "--max-steps", "1", "--eval-every", "1", "--eval-batches", "1",
         "--device", "cpu", "--out", str(tmp_path)])
    assert "step 1: val_loss" in capsys.readouterr().out
    assert calls == {"check_config": 1, "check_device": 1}
    assert json.loads((tmp_path / "config.json").read_text())["kind"] == "hybrid"


def test_a_config_mistake_is_a_config_error_and_a_value_error(tmp_path):
    with pytest.raises(ConfigError, match="kind must be one of") as error:
        train(TrainConfig(kind="linear", out=str(tmp_path)), progress=False)
    assert isinstance(error.value, ValueError)


def test_train_names_the_studys_rejected_options_without_importing_the_study():
    """The hint for an option only the study's probes take: train reads the names from minina.scores, one list that
    the study's CandidateScore takes, so that the run's check never imports the study."""
    assert train_module.REJECTED_SCORE_OPTIONS == minina.scores.REJECTED_SCORE_OPTIONS
    assert set(minina.scores.REJECTED_SCORE_OPTIONS) <= set(inspect.signature(candidates.CandidateScore).parameters)
    assert not set(minina.scores.REJECTED_SCORE_OPTIONS) & set(inspect.signature(minina.NeuralScore).parameters)
