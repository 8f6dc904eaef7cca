"""The probe tasks against brute-force references, the generalized train_probe, and the learnability study."""
import csv
import subprocess
import sys

import pytest
import torch

from minina.study import (CURVE_EVERY, DEFAULT_VARIANTS, PROBES, VARIANTS, format_table, plot_study, run_study, steps_to,
                          summarize, wilson_interval)
from minina.tasks import TASKS, AttentionProbe, train_probe


@pytest.fixture(autouse=True)
def _one_thread():
    """The probes are tiny: one thread is fastest, and two thrash on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RELATIONS = {  # independent reference: the key each task selects, one (query, key) pair at a time
    "nearest_key": lambda xq, xj: -abs(xq[0] - xj[0]),
    "ring_key": lambda xq, xj: -abs(abs(xq[0] - xj[0]) - 0.5),
    "nearest_2d": lambda xq, xj: -((xq[0] - xj[0]) ** 2 + (xq[1] - xj[1]) ** 2),
    "extreme_key": lambda xq, xj: xq[0] * xj[0],
}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_task_targets_match_brute_force(name):
    queries, keys, values, target = TASKS[name](16, 6, generator=torch.Generator().manual_seed(0))
    assert values.shape == (16, 6, 1) and target.shape == (16, 1, 1) and keys.shape[:2] == (16, 6)
    assert queries.abs().max() <= 1 and keys.abs().max() <= 1
    for b in range(16):
        xq = queries[b, 0].tolist()
        best = max(range(6), key=lambda j: RELATIONS[name](xq, keys[b, j].tolist()))
        assert target[b, 0, 0] == values[b, best, 0]


def test_control_task_is_affine_in_the_key():
    """extreme_key's right logit x_q x_j is a dot product of affine maps, so a sharp dot-product head solves it."""
    queries, keys, values, target = TASKS["extreme_key"](64, 8, generator=torch.Generator().manual_seed(1))
    weights = torch.softmax(1e4 * queries @ keys.transpose(1, 2), dim=-1)  # (B, 1, S)
    torch.testing.assert_close(weights @ values, target, atol=5e-3, rtol=0)  # near-ties share a little weight


def test_train_probe_by_task_name_is_the_same_run():
    by_name = train_probe("neural", 0, steps=5, task="nearest_key", test_size=64)
    by_function = train_probe("neural", 0, steps=5, task=TASKS["nearest_key"], test_size=64)
    assert by_name["losses"] == by_function["losses"] and by_name["test_mse"] == by_function["test_mse"]
    assert isinstance(by_name["model"], AttentionProbe) and by_name["model"].kind == "neural"
    two_d = train_probe("dot", 0, steps=5, task="nearest_2d", test_size=64)
    assert len(two_d["losses"]) == 5
    with pytest.raises(ValueError, match="task must be one of"):
        train_probe("dot", 0, steps=1, task="nope")


def test_steps_to_and_summary():
    assert steps_to("0.9 0.5 0.2 0.1", 0.25) == 3 * CURVE_EVERY
    assert steps_to([0.9, 0.8], 0.25) is None
    rows = [{"task": "t", "variant": v, "seed": s, "steps": 4 * CURVE_EVERY, "test_mse": e, "curve": c}
            for v, s, e, c in [("a", 0, 0.10, "0.9 0.1 0.1 0.1"), ("a", 1, 0.50, "0.9 0.6 0.5 0.5"),
                               ("b", 0, 0.12, "0.9 0.9 0.3 0.3"), ("b", 1, 0.13, "0.9 0.9 0.9 0.1")]]
    summary = summarize(rows, margin=0.05)
    assert summary["t"]["best"] == 0.10 and summary["t"]["threshold"] == pytest.approx(0.15)
    a, b = summary["t"]["variants"]["a"], summary["t"]["variants"]["b"]
    assert (a["successes"], a["seeds"], a["median_steps"]) == (1, 2, 2 * CURVE_EVERY)
    # b's first seed passed on the test set but its training average never did: counted at its last step
    assert (b["successes"], b["median_steps"]) == (2, (4 * CURVE_EVERY + 4 * CURVE_EVERY) / 2)
    assert a["mean"] == pytest.approx(0.3) and a["errors"] == [0.10, 0.50]
    assert summary["t"]["dot"] is None and a["stalls"] is None and "1/2" in format_table(summary)
    rows += [{"task": "t", "variant": "dot", "seed": s, "steps": 4 * CURVE_EVERY, "test_mse": e, "curve": "0.5"}
             for s, e in [(0, 0.2), (1, 0.4), (2, 0.3)]]
    summary = summarize(rows, margin=0.05)
    assert summary["t"]["dot"] == pytest.approx(0.3)
    assert summary["t"]["variants"]["a"]["stalls"] == 1 and summary["t"]["variants"]["b"]["stalls"] == 0
    assert summary["t"]["variants"]["dot"]["stalls"] is None and "worse than the median dot run" in format_table(summary)


@pytest.mark.parametrize("successes, trials, expected", [  # Wilson (1927) 95% intervals, computed by hand
    (2, 10, (0.0567, 0.5098)), (9, 10, (0.5958, 0.9821)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)),
    (27, 30, (0.7438, 0.9654))])
def test_wilson_interval(successes, trials, expected):
    assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)
    low, high = wilson_interval(successes, trials)
    assert low <= successes / trials <= high


def test_wilson_interval_errors_and_summary_field():
    for successes, trials in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError, match="need 0 <= successes <= trials"):
            wilson_interval(successes, trials)
    rows = [{"task": "t", "variant": "a", "seed": s, "steps": CURVE_EVERY, "test_mse": e, "curve": "0.1"}
            for s, e in enumerate([0.1, 0.1, 0.9])]
    stats = summarize(rows)["t"]["variants"]["a"]
    assert stats["interval"] == wilson_interval(2, 3) and "0.21-0.94" in format_table(summarize(rows))


def test_default_variants_are_known_and_keep_the_baselines():
    assert set(DEFAULT_VARIANTS) <= set(VARIANTS) and {"dot", "paper", "kaiming", "gelu"} <= set(DEFAULT_VARIANTS)


def test_run_study_writes_resumes_and_plots(tmp_path):
    path = tmp_path / "results.csv"
    rows = run_study(["extreme_key"], ["dot", "scale"], seeds=2, steps=CURVE_EVERY, csv_path=path, workers=1,
                     progress=False)
    assert len(rows) == 4
    direct = train_probe("neural", 1, steps=CURVE_EVERY, task="extreme_key", proj_dim=8,
                         score_options=VARIANTS["scale"])
    assert [r["test_mse"] for r in rows if r["variant"] == "scale" and r["seed"] == 1] == [direct["test_mse"]]
    again = run_study(["extreme_key"], ["dot", "scale"], seeds=2, steps=CURVE_EVERY, csv_path=path, workers=1,
                      progress=False)
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # nothing retrained, nothing appended twice
    assert sorted(r["test_mse"] for r in again) == pytest.approx(sorted(r["test_mse"] for r in rows), abs=1e-6)
    plot_study(again, summarize(again), tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, match", [({"tasks": ["nope"]}, "unknown tasks/variants"),
                                           ({"variants": ["nope"]}, "unknown tasks/variants"),
                                           ({"seeds": 0}, "need seeds >= 1"),
                                           ({"steps": 1}, "need seeds >= 1")])
def test_run_study_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_study(**kwargs)


def test_cli_prints_table_and_writes_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minina", "study-learnability", "--seeds", "1", "--steps",
                             str(CURVE_EVERY), "--tasks", "nearest_key", "--variants", "dot", "paper",
                             "--workers", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("nearest_key ")]
    assert [row[1] for row in rows] == ["dot", "paper"]
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.png").exists()
