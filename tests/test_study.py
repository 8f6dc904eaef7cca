"""The probe tasks against brute-force references, the generalized train_probe, and the learnability study."""
import csv
import subprocess
import sys

import pytest
import torch

from minina.tools.study import (CANDIDATES, CURVE_EVERY, DEFAULT_CANDIDATES, ESCAPE_FACTOR, FIELDS, HELD_OUT,
                                PROBES, SUMMARY_FIELDS, dot_floor_estimate, format_table, plot_study, run_study,
                                steps_to, summarize, summary_rows, task_keys, wilson_interval)
from minina.tools.probes import TASKS, AttentionProbe, train_probe


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


def held_out_reference(name, xq, keys):
    """Independent reference for a held-out task: the indices of the keys whose values the target averages."""
    distance = [sum((a - b) ** 2 for a, b in zip(xq[: len(key)], key)) ** 0.5 for key in keys]
    if name == "ball_mean":
        inside = [j for j, d in enumerate(distance) if d <= xq[1]]
        return inside or [min(range(len(keys)), key=lambda j: distance[j])]
    if name == "annulus_2d":
        inside = [j for j, d in enumerate(distance) if 0.3 <= d <= 0.7]
        return inside or [min(range(len(keys)), key=lambda j: abs(distance[j] - 0.5))]
    if name == "k_nearest":
        return sorted(range(len(keys)), key=lambda j: distance[j])[:3]
    return [min(range(len(keys)), key=lambda j: distance[j])]  # nearest_3d


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_held_out_targets_match_brute_force(name):
    S = HELD_OUT[name]
    queries, keys, values, target = TASKS[name](32, S, generator=torch.Generator().manual_seed(0))
    assert values.shape == (32, S, 1) and target.shape == (32, 1, 1) and keys.shape[:2] == (32, S)
    assert queries.shape[:2] == (32, 1) and keys.abs().max() <= 1 and queries[..., 0].abs().max() <= 1
    for b in range(32):
        chosen = held_out_reference(name, queries[b, 0].tolist(), keys[b].tolist())
        expected = sum(values[b, j, 0].item() for j in chosen) / len(chosen)
        assert target[b, 0, 0].item() == pytest.approx(expected, abs=1e-6)
    if name == "ball_mean":  # the query carries its radius, in [0.1, 0.5]
        assert 0.1 <= queries[..., 1].min() and queries[..., 1].max() <= 0.5


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_per_seed_and_take_fixed_queries(name):
    draw = lambda seed: TASKS[name](8, 6, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(draw(3), draw(3)))
    assert not torch.equal(draw(3)[1], draw(4)[1])
    queries = draw(5)[0]
    fixed = TASKS[name](8, 6, generator=torch.Generator().manual_seed(6), queries=queries)
    assert fixed[0] is queries
    with pytest.raises(ValueError, match="queries must have shape"):
        TASKS[name](8, 6, queries=queries[:4])


def test_held_out_family_is_apart_from_the_probes():
    assert set(PROBES) | set(HELD_OUT) == set(TASKS) and not set(PROBES) & set(HELD_OUT)
    assert len(HELD_OUT) >= 4 and ESCAPE_FACTOR == 0.5 and task_keys("ball_mean") == HELD_OUT["ball_mean"]


def test_dot_floor_estimate_is_a_floor():
    """The control is within a dot head's reach; every other task is not, and a trained dot head stays above it."""
    assert dot_floor_estimate("extreme_key", 8, queries=32, draws=64) < 0.02
    for name, keys in {"nearest_key": 8, **HELD_OUT}.items():
        floor = dot_floor_estimate(name, keys, queries=32, draws=64)
        zero = TASKS[name](4096, keys, generator=torch.Generator().manual_seed(1))[3].pow(2).mean().item()
        assert 0.3 * zero < floor < zero  # well above 0: out of a dot head's reach, below predicting 0
        trained = train_probe("dot", 0, steps=300, num_keys=keys, task=name, test_size=2048)["test_mse"]
        assert trained >= 0.9 * floor, (name, trained, floor)


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
    rows = [{"task": "t", "candidate": v, "seed": s, "steps": 4 * CURVE_EVERY, "test_mse": e, "curve": c}
            for v, s, e, c in [("a", 0, 0.10, "0.9 0.1 0.1 0.1"), ("a", 1, 0.50, "0.9 0.6 0.5 0.5"),
                               ("b", 0, 0.12, "0.9 0.9 0.3 0.3"), ("b", 1, 0.13, "0.9 0.9 0.9 0.1")]]
    summary = summarize(rows, margin=0.05)
    assert summary["t"]["best"] == 0.10 and summary["t"]["threshold"] == pytest.approx(0.15)
    a, b = summary["t"]["candidates"]["a"], summary["t"]["candidates"]["b"]
    assert (a["successes"], a["seeds"], a["median_steps"]) == (1, 2, 2 * CURVE_EVERY)
    # b's first seed passed on the test set but its training average never did: counted at its last step
    assert (b["successes"], b["median_steps"]) == (2, (4 * CURVE_EVERY + 4 * CURVE_EVERY) / 2)
    assert a["mean"] == pytest.approx(0.3) and a["errors"] == [0.10, 0.50]
    assert summary["t"]["dot"] is None and a["stalls"] is None and "1/2" in format_table(summary)
    rows += [{"task": "t", "candidate": "dot", "seed": s, "steps": 4 * CURVE_EVERY, "test_mse": e, "curve": "0.5"}
             for s, e in [(0, 0.2), (1, 0.4), (2, 0.3)]]
    summary = summarize(rows, margin=0.05)
    assert summary["t"]["dot"] == pytest.approx(0.3)
    assert summary["t"]["candidates"]["a"]["stalls"] == 1 and summary["t"]["candidates"]["b"]["stalls"] == 0
    assert summary["t"]["candidates"]["dot"]["stalls"] is None
    assert "worse than the median dot run" in format_table(summary)


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
    rows = [{"task": "t", "candidate": "a", "seed": s, "steps": CURVE_EVERY, "test_mse": e, "curve": "0.1"}
            for s, e in enumerate([0.1, 0.1, 0.9])]
    stats = summarize(rows)["t"]["candidates"]["a"]
    assert stats["interval"] == wilson_interval(2, 3) and "0.21-0.94" in format_table(summarize(rows))


def test_default_candidates_are_known_and_keep_the_baselines_and_candidates():
    assert set(DEFAULT_CANDIDATES) <= set(CANDIDATES)
    assert {"dot", "paper", "wide+gelu", "residual", "residual+wide+gelu"} <= set(DEFAULT_CANDIDATES)


def test_escape_precision_and_stalls_on_synthetic_errors():
    rows = [{"task": task, "candidate": v, "seed": s, "steps": CURVE_EVERY, "test_mse": e, "curve": "0.1"}
            for task in ("ring_key", "ball_mean")
            for v, errors in [("dot", [0.8, 0.6, 0.9]), ("a", [0.05, 0.29, 0.31]), ("b", [0.95, 0.02, 0.2])]
            for s, e in enumerate(errors)]
    summary = summarize(rows, margin=0.05)
    entry = summary["ball_mean"]
    assert entry["dot_best"] == 0.6 and entry["escape_threshold"] == pytest.approx(0.3) and entry["dot"] == 0.8
    a, b = entry["candidates"]["a"], entry["candidates"]["b"]
    assert (a["escapes"], b["escapes"], entry["candidates"]["dot"]["escapes"]) == (2, 2, 0)  # 0.31 > 0.3 does not
    assert a["escape_interval"] == wilson_interval(2, 3)
    assert a["distances"] == pytest.approx([0.03, 0.27, 0.29]) and b["median_distance"] == pytest.approx(0.18)
    assert (a["successes"], b["successes"]) == (1, 1)  # within best 0.02 + 0.05
    assert (a["stalls"], b["stalls"]) == (0, 1)  # b's 0.95 is worse than the median dot run
    table = format_table(summary)
    assert table.index("ring_key") < table.index("Held-out family") < table.index("ball_mean")
    assert "2/3 (0.21-0.94)" in table and "0.5 x best dot run = 0.300" in table
    rows_out = summary_rows(summary)
    assert [r["family"] for r in rows_out] == ["probes"] * 3 + ["held-out"] * 3
    assert all(set(r) == set(SUMMARY_FIELDS) for r in rows_out) and rows_out[4]["errors"] == "0.05000 0.29000 0.31000"
    no_dot = summarize([row for row in rows if row["candidate"] != "dot"])["ring_key"]
    assert no_dot["escape_threshold"] is None and no_dot["candidates"]["a"]["escapes"] is None


def test_run_study_writes_resumes_and_plots(tmp_path):
    path = tmp_path / "results.csv"
    rows = run_study(["extreme_key"], ["dot", "scale"], seeds=2, steps=CURVE_EVERY, csv_path=path, workers=1,
                     progress=False)
    assert len(rows) == 4
    direct = train_probe("neural", 1, steps=CURVE_EVERY, task="extreme_key", proj_dim=8,
                         score_options=CANDIDATES["scale"])
    assert [r["test_mse"] for r in rows if r["candidate"] == "scale" and r["seed"] == 1] == [direct["test_mse"]]
    again = run_study(["extreme_key"], ["dot", "scale"], seeds=2, steps=CURVE_EVERY, csv_path=path, workers=1,
                      progress=False)
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # nothing retrained, nothing appended twice
    assert sorted(r["test_mse"] for r in again) == pytest.approx(sorted(r["test_mse"] for r in rows), abs=1e-6)
    with open(path, "a") as f:
        f.write("extreme_key,dot,2,50,8,8,0.5")  # a run killed while its row was written: no newline, no curve
    with pytest.warns(UserWarning, match="skipping 1 incomplete row"):
        third = run_study(["extreme_key"], ["dot"], seeds=3, steps=CURVE_EVERY, csv_path=path, workers=1,
                          progress=False)
    assert sorted(r["seed"] for r in third) == [0, 1, 2]
    with open(path, newline="") as f:  # seed 2 trained again, on a line of its own
        assert [row["seed"] for row in csv.DictReader(f) if row["curve"]] == ["0", "0", "1", "1", "2"]
    plot_study(again, summarize(again), tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


def test_a_csv_with_other_columns_is_refused_not_resumed(tmp_path):
    """A results.csv written before 'variant' was renamed 'candidate' would never match a run: it is refused."""
    path = tmp_path / "results.csv"
    path.write_text(",".join(["task", "variant"] + FIELDS[2:]) + "\nextreme_key,dot,0,50,8,8,0.5,1.0,0.5\n")
    with pytest.raises(ValueError, match=r"results.csv has the columns \['task', 'variant'"):
        run_study(["extreme_key"], ["dot"], seeds=1, steps=CURVE_EVERY, csv_path=path, workers=1, progress=False)
    assert path.read_text().count("\n") == 2  # left as it was


@pytest.mark.parametrize("kwargs, match", [({"tasks": ["nope"]}, "unknown tasks/candidates"),
                                           ({"candidates": ["nope"]}, "unknown tasks/candidates"),
                                           ({"seeds": 0}, "need seeds >= 1"),
                                           ({"steps": 1}, "need seeds >= 1")])
def test_run_study_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_study(**kwargs)


def test_cli_prints_table_and_writes_files(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minina", "study-learnability", "--seeds", "1", "--steps",
                             str(CURVE_EVERY), "--tasks", "nearest_key", "--candidates", "dot", "paper",
                             "--workers", "1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("nearest_key ")]
    assert [row[1] for row in rows] == ["dot", "paper"]
    assert (tmp_path / "results.csv").exists() and (tmp_path / "results.png").exists()
    assert (tmp_path / "summary.csv").exists() and "Held-out family" not in result.stdout


def test_cli_held_out_runs_the_family_apart(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minina", "study-learnability", "--held-out", "--seeds", "1",
                             "--steps", str(CURVE_EVERY), "--candidates", "dot", "--workers", "1", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Held-out family" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["dot"]] == list(HELD_OUT)
    with open(tmp_path / "results.csv", newline="") as f:
        assert {(row["task"], int(row["num_keys"])) for row in csv.DictReader(f)} == set(HELD_OUT.items())
    assert (tmp_path / "summary-held-out.csv").exists() and (tmp_path / "results-held-out.png").exists()
