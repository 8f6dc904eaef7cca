"""The README's quick start and the command line, run as a user would."""
import argparse
import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minina.tools import train, train_flags
from minina.tools.config import TrainConfig
from minina.tools.cli import COMMANDS, main

README = Path(__file__).resolve().parents[1] / "README.md"
TRAINING_PAGE = Path(__file__).resolve().parents[1] / "docs" / "training.md"  # the course site's Training page


def test_readme_quick_start_runs():
    text = README.read_text(encoding="utf-8")
    snippet = re.search(r"## Quick start\n+```python\n(.*?)```", text, re.S).group(1)
    exec(compile(snippet, "README quick start", "exec"), {})


def test_demo_command_prints_table():
    result = subprocess.run([sys.executable, "-m", "minina", "demo", "--seeds", "2", "--steps", "30"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("dot    ", "neural    "))]
    assert [row[0] for row in rows] == ["dot", "neural"]
    assert all(len(row) == 1 + 2 + 3 for row in rows)  # kind, 2 seeds, "mean ± std"


def test_unknown_command_fails_with_usage():
    result = subprocess.run([sys.executable, "-m", "minina", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "invalid choice" in result.stderr


def without_unix_only_modules(tmp_path):
    """An environment whose Python processes cannot import resource and fcntl (Unix only), as on Windows."""
    shim = tmp_path / "windows_like"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nfor name in ("resource", "fcntl"):\n'
                                           '    sys.modules[name] = None  # as on Windows\n')
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])}


def test_cli_runs_without_unix_only_modules(tmp_path):
    env = without_unix_only_modules(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import resource"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0  # the shim works
    helps = "".join(f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit as end:\n    assert end.code == 0\n"
                    for command in COMMANDS)  # every command's --help, in one process to spare start-ups
    result = subprocess.run([sys.executable, "-c", "from minina.__main__ import main\n" + helps], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("usage: python -m minina") == len(COMMANDS), result.stderr
    demo = subprocess.run([sys.executable, "-m", "minina", "demo", "--seeds", "1", "--steps", "20"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0 and "on 1 CPU thread." in demo.stdout, demo.stderr
    bench = subprocess.run([sys.executable, "-m", "minina", "bench", "--ns", "32", "--backends", "sdpa", "chunked",
                            "--heads", "2", "--repeats", "0", "--threads", "1", "--out", str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    with open(tmp_path / "bench.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["backend"] for row in rows] == ["sdpa", "chunked"] and all(float(row["peak_mib"]) >= 0 for row in rows)


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize("argv, message", [
    pytest.param(["train", "--device", "cuda"], "device 'cuda' needs a CUDA GPU, but torch.cuda.is_available() is "
                 "False", marks=NO_GPU),
    pytest.param(["bench", "--device", "cuda"], "--device cuda needs a CUDA GPU, but torch.cuda.is_available() is "
                 "False", marks=NO_GPU),
    (["train", "--score-options", '{"inti": "kaiming"}'], "score_options has unknown key(s) ['inti']: NeuralScore "
     "takes ['hidden', 'activation', 'residual']"),
    (["train", "--score-options", '{"activation": "gelo"}'], "activation must be one of ['gelu', 'relu'], got 'gelo'"),
    (["train", "--score-options", '{"init": "kaiming"}'], "score_options has unknown key(s) ['init']: NeuralScore "
     "takes ['hidden', 'activation', 'residual'] (proj_dim has its own flag), e.g. {\"hidden\": \"wide\", "
     "\"activation\": \"gelu\"}; init: rejected by the learnability study, only its probes take it "
     "(minina.tools.candidates)"),
    (["train", "--score-options", '{"activation": "leaky_relu"}'], "got 'leaky_relu'; activation='leaky_relu': "
     "rejected by the learnability study, only its probes take it (minina.tools.candidates)"),
    (["train", "--score-options", '{"proj_dim": 4}'], "score_options has unknown key(s) ['proj_dim']: NeuralScore "
     "takes ['hidden', 'activation', 'residual'] (proj_dim has its own flag), e.g. {\"hidden\": \"wide\", "
     "\"activation\": \"gelu\"} (see"),  # no hint: proj_dim is no study option
    (["train", "--score-options", "{init: kaiming}"], "argument --score-options: expected a JSON object such as "
     '{"hidden": "wide", "activation": "gelu"} (names and strings in double quotes), got \'{init: kaiming}\''),
    (["train", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["train", "--backend", "flash"], "backend must be one of ('auto', 'reference', "),  # checked once, by train()
    (["train", "--kind", "linear"], "kind must be one of ('dot', 'neural', 'hybrid'), got 'linear'"),
    (["demo", "--seeds", "0"], "argument --seeds: must be a whole number of at least 1, got '0'"),
    (["demo", "--steps", "-1"], "argument --steps: must be a whole number of at least 1, got '-1'"),
    (["bench", "--threads", "0"], "--threads must be at least 1, got 0"),
])
def test_each_mistake_is_one_line_and_exit_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as end:
        main(argv)
    err = capsys.readouterr().err
    assert end.value.code == 2
    assert err.count("\n") == 1 and err.startswith(f"python -m minina {argv[0]}: error: ") and message in err, err


def test_train_takes_kind_not_the_name_before_it(capsys):
    with pytest.raises(SystemExit) as end:
        main(["train", "--attention", "dot"])
    assert end.value.code == 2 and "unrecognized arguments: --attention dot" in capsys.readouterr().err


@NO_GPU
def test_train_on_a_missing_gpu_as_a_user_runs_it():
    result = subprocess.run([sys.executable, "-m", "minina", "train", "--device", "cuda"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "use --device cpu" in result.stderr, \
        result.stderr


def parse_train(argv):
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(argv)


def test_vit_without_a_dataset_takes_cifar10():
    config = train_flags.config_from_args(parse_train(["--task", "vit"]))
    assert (config.dataset, config.out) == ("cifar10", "runs/vit-cifar10-hybrid-seed0")
    assert train_flags.config_from_args(parse_train([])).dataset == "tinyshakespeare"
    assert TrainConfig(task="vit").dataset == "cifar10"


def test_train_help_lists_the_datasets_and_says_what_none_means(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in ("tinyshakespeare", "wikitext2", "wikitext103", "recall_ring", "recall_nearest", "cifar10",
                 "cifar100", "fashion-mnist"):
        assert name in text
    assert "default None" not in text
    assert "resize the images to this many pixels a side (default: as stored)" in text


def test_train_threads_sets_torchs_threads(monkeypatch):
    seen = {}
    monkeypatch.setattr(train, "train", lambda config, **kwargs: seen.update(threads=torch.get_num_threads()) or
                        {"interrupted": False})
    threads = torch.get_num_threads()
    try:
        main(["train", "--threads", "1", "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert seen == {"threads": 1}
    seen.clear()
    torch.set_num_threads(2)
    try:
        main(["train", "--device", "cpu"])  # tiny CPU models: one thread unless told otherwise
    finally:
        torch.set_num_threads(threads)
    assert seen == {"threads": 1}


def test_training_page_commands_give_the_reliable_score_on_every_shell():
    """The --score-options example is the study's pick, written for POSIX shells (single quotes) and for Windows,
    whose programs split their command line by the C runtime's rules (subprocess.list2cmdline writes them)."""
    from minina.scores import RELIABLE_SCORE_OPTIONS

    text = TRAINING_PAGE.read_text(encoding="utf-8")
    training = re.search(r"^# Training\n(.*)", text, re.M | re.S).group(1)
    posix = re.search(r"^python -m minina train --kind hybrid --score-options .*?\\\n.*?$", training, re.M)
    argv = shlex.split(posix.group(0).replace("\\\n", " "))[4:]  # after "python -m minina train"
    assert train_flags.config_from_args(parse_train(argv)).score_options == RELIABLE_SCORE_OPTIONS
    windows = subprocess.list2cmdline(["--score-options", json.dumps(RELIABLE_SCORE_OPTIONS)])
    assert training.count(windows) == 2  # cmd, and PowerShell after --%
    assert "--% " + windows in training
    for setting in ("export MININA_DATA=", "set MININA_DATA=", "$env:MININA_DATA = "):
        assert setting in training


@pytest.mark.parametrize("kwargs, message", [(dict(seeds=0), "seeds must be a positive int, got 0"),
                                             (dict(steps=-1), "steps must be a positive int, got -1")])
def test_demo_run_refuses_nothing_to_train(kwargs, message):
    from minina.tools import demo

    with pytest.raises(ValueError, match=message):
        demo.run(**kwargs)
