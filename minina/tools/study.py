"""`python -m minina study-learnability`: which score options make training find what the score can express.

Trains one attention head (probes.AttentionProbe) per (task, candidate, seed) and asks, per task, how many seeds
escape the dot-product floor (test MSE at most ESCAPE_FACTOR times the best dot-product run's) and how many reach
the task's best test error within a margin (precision), and how fast. A run is within the margin when its test
MSE is at most best + margin, best being the lowest test MSE of any run on that task; its steps to it are the
first step at which the training loss, averaged over a window of CURVE_EVERY steps, falls to that threshold.
Options are chosen on PROBES; the HELD_OUT family (--held-out) is reported apart and never tuned on.
Each finished run is appended to the CSV at once; rerunning the same command skips the runs already there.
"""
import csv
import inspect
import math
import multiprocessing
import statistics
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .probes import TASKS, train_probe

HELP = "success rate over seeds of score training options on probe tasks (CSV, table, plot)"

# The protocol, written down before any held-out result existed (docs/learnability.md, Protocol).
# Options are chosen on PROBES only. HELD_OUT is a second family of non-affine attention patterns of other shapes
# and sizes, reported apart and never tuned on. Both map task -> number of keys; every run is one AttentionProbe,
# Adam 3e-3, batch 256, head_dim 16, d' = 8, 1,500 steps. Per task, with the dot-product runs on the same seeds:
# - escape: test MSE <= ESCAPE_FACTOR x the best dot-product run's (beating the floor no dot head passes);
# - precision: test MSE - the best run among all candidates run together (a count: within the margin, 0.05);
# - stall: test MSE > the median dot-product run.
# dot_floor_estimate gives each task's floor from its data alone, without training, as a check on the dot runs.
PROBES = {"nearest_key": 8, "ring_key": 8, "nearest_2d": 8, "extreme_key": 8}
HELD_OUT = {"ball_mean": 16, "annulus_2d": 12, "k_nearest": 16, "nearest_3d": 12}
ESCAPE_FACTOR = 0.5

# candidate -> score_options for the probe's CandidateScore; None is the dot-product baseline
CANDIDATES = {
    "dot": None,
    "paper": {},
    "scale": {"learn_scale": True},
    "kaiming": {"init": "kaiming"},
    "kaiming+scale": {"init": "kaiming", "learn_scale": True},
    "gelu": {"activation": "gelu"},
    "leaky": {"activation": "leaky_relu"},
    "bias": {"bias_init": 0.5},
    "wide": {"hidden": "wide"},
    "residual": {"residual": True},
    "wide+gelu": {"hidden": "wide", "activation": "gelu"},
    "residual+wide+gelu": {"residual": True, "hidden": "wide", "activation": "gelu"},
    "residual+mlp-init": {"residual": True, "zero_last": False},
}
# what the command runs by default: the baselines, today's recommendation "wide+gelu" (docs/learnability.md)
# and the residual candidates; the others (kaiming, gelu, leaky, bias, wide, scale) run with --candidates
DEFAULT_CANDIDATES = ("dot", "paper", "wide+gelu", "residual", "residual+wide+gelu", "residual+mlp-init")
CURVE_EVERY = 50  # training-loss curve resolution (steps) kept in the CSV
FIELDS = ["task", "candidate", "seed", "steps", "num_keys", "proj_dim", "test_mse", "seconds", "curve"]
SUMMARY_FIELDS = ["family", "task", "candidate", "seeds", "escapes", "escape_low", "escape_high", "within_margin",
                  "margin_low", "margin_high", "stalls", "median_distance", "escape_threshold", "threshold",
                  "dot_median", "errors"]


def train_run(task, candidate, seed, steps=1500, num_keys=None, proj_dim=8):
    """Train one probe of a CANDIDATES entry on a TASKS entry; returns (CSV row with FIELDS, trained model).

    num_keys: None for the task's own (task_keys).
    """
    start = time.perf_counter()
    num_keys = task_keys(task) if num_keys is None else num_keys
    kind = "dot" if CANDIDATES[candidate] is None else "neural"
    result = train_probe(kind, seed, steps=steps, num_keys=num_keys, proj_dim=proj_dim,
                         score_options=CANDIDATES[candidate], task=task)
    losses = torch.tensor(result["losses"])
    curve = losses[: steps - steps % CURVE_EVERY].view(-1, CURVE_EVERY).mean(dim=1)  # (steps // CURVE_EVERY,)
    row = {"task": task, "candidate": candidate, "seed": seed, "steps": steps, "num_keys": num_keys,
           "proj_dim": proj_dim, "test_mse": result["test_mse"], "seconds": time.perf_counter() - start,
           "curve": " ".join(f"{x:.5f}" for x in curve.tolist())}
    return row, result["model"]


def _train_in_worker(job):
    torch.set_num_threads(1)
    return train_run(*job)[0]


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if reader.fieldnames is not None and reader.fieldnames != FIELDS:
        raise ValueError(f"{path} has the columns {reader.fieldnames}, this study writes {FIELDS} (a CSV of an older "
                         "minina, whose 'variant' is now 'candidate'?): rename its columns or give another --out")
    complete = [row for row in rows if all(row.get(key) not in (None, "") for key in FIELDS[:8])]
    if len(complete) < len(rows):  # a run killed while its row was written: train it again
        warnings.warn(f"{path}: skipping {len(rows) - len(complete)} incomplete row(s); those runs are retrained")
    rows = complete
    for row in rows:
        for key in ("seed", "steps", "num_keys", "proj_dim"):
            row[key] = int(row[key])
        row["test_mse"], row["seconds"] = float(row["test_mse"]), float(row["seconds"])
    return rows


def _open_csv(path):
    """(file, csv.DictWriter) appending rows with FIELDS to path, after a header if the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    ends_mid_row = not new_file and path.read_bytes()[-1:] != b"\n"  # a run killed while its row was written
    handle = open(path, "a", newline="")
    if ends_mid_row:
        handle.write("\n")
    writer = csv.DictWriter(handle, FIELDS)
    if new_file:
        writer.writeheader()
    return handle, writer


def task_keys(task):
    """The number of keys the protocol gives a task (PROBES, HELD_OUT; 8 for any other)."""
    return PROBES.get(task) or HELD_OUT.get(task) or 8


def family(task):
    """"probes", "held-out" or "other": which family of the protocol a task belongs to."""
    return "probes" if task in PROBES else "held-out" if task in HELD_OUT else "other"


def run_study(tasks=tuple(PROBES), candidates=DEFAULT_CANDIDATES, seeds=10, steps=1500, num_keys=None, proj_dim=8,
              csv_path=None, workers=2, progress=True):
    """Train every (task, candidate, seed); returns the rows (dicts with FIELDS).

    num_keys: keys per example, None for each task's own (task_keys). csv_path: append each finished run there and
    reuse the matching runs it already holds. workers > 1 trains runs in a process pool; every run uses one thread
    (these probes are too small to gain from more, and on a busy machine several threads per tiny op thrash).
    """
    unknown = [t for t in tasks if t not in TASKS] + [v for v in candidates if v not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown tasks/candidates {unknown}; tasks: {sorted(TASKS)}, candidates: {list(CANDIDATES)}")
    if seeds < 1 or steps < CURVE_EVERY or workers < 1:
        raise ValueError(f"need seeds >= 1, steps >= {CURVE_EVERY}, workers >= 1; got {seeds}, {steps}, {workers}")
    # seeds outermost, so an interrupted study holds the same seeds for every task and candidate
    jobs = [(t, v, s, steps, num_keys or task_keys(t), proj_dim)
            for s in range(seeds) for t in tasks for v in candidates]
    done = {}
    if csv_path is not None and Path(csv_path).exists():
        for row in _read_csv(csv_path):
            done[tuple(row[k] for k in FIELDS[:6])] = row
    rows = [done[job] for job in jobs if job in done]
    todo = [job for job in jobs if job not in done]
    handle, writer = _open_csv(csv_path) if csv_path is not None else (None, None)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and len(todo) > 1 else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = pool.imap_unordered(_train_in_worker, todo) if pool else (train_run(*job)[0] for job in todo)
        for row in tqdm(results, total=len(todo), desc="study", unit="run", disable=not progress):
            rows.append(row)
            if writer is not None:
                writer.writerow(row)
                handle.flush()
    finally:
        torch.set_num_threads(threads)
        if pool:
            pool.terminate()
        if writer is not None:
            handle.close()
    return rows


def _directions(dim, count):
    """count unit vectors spread over the sphere in R^dim (dim 1: +-1; 2: a circle; 3: a Fibonacci sphere)."""
    if dim == 1:
        return torch.tensor([[1.0], [-1.0]])
    i = torch.arange(count, dtype=torch.float64)
    if dim == 2:
        angle = 2 * math.pi * i / count
        return torch.stack([angle.cos(), angle.sin()], dim=-1).float()
    if dim == 3:
        z = 1 - 2 * (i + 0.5) / count
        angle = math.pi * (3 - math.sqrt(5)) * i
        radius = (1 - z * z).sqrt()
        return torch.stack([radius * angle.cos(), radius * angle.sin(), z], dim=-1).float()
    raise ValueError(f"key points must have 1 to 3 features, got {dim}")


def dot_floor_estimate(task, num_keys, queries=128, draws=128, seed=0):
    """The test MSE below which no one-head dot-product AttentionProbe can go on a task, estimated from its data.

    For a fixed query a dot-product head weights the keys by softmax(beta . x_j) (the term q . b_k is the same for
    every key) and outputs alpha sum_j w_j y_j + gamma, with beta, alpha, gamma set by the query alone. For each
    of `queries` query points this draws `draws` key sets and takes the best beta on a grid (directions times
    sharpness, and 0: uniform attention) with its best alpha (gamma = 0, the values' mean): mean t^2 -
    mean(o t)^2 / mean(o^2) for outputs o and targets t. Letting beta and alpha vary freely with the query, and
    picking them on the same draws, can only lower the estimate: a trained dot head should not go below it.
    """
    task = TASKS[task] if isinstance(task, str) else task
    generator = torch.Generator().manual_seed(seed)
    points = task(queries, num_keys, generator=generator)[0]  # (Q, 1, D)
    sharpness = torch.cat([torch.zeros(1), torch.logspace(-2, 9, 23, base=2)])  # (M,) from uniform to near argmax
    floors = []
    for point in points:
        fixed = point.expand(draws, 1, -1)  # (K, 1, D)
        _, keys, values, target = task(draws, num_keys, generator=generator, queries=fixed)
        betas = (_directions(keys.shape[-1], 64).unsqueeze(0) * sharpness.view(-1, 1, 1)).flatten(0, 1)  # (G, d)
        weights = torch.softmax(keys @ betas.T, dim=1)  # (K, S, G)
        outputs = (weights * values).sum(dim=1).double()  # (K, G)
        t = target.view(-1, 1).double()  # (K, 1)
        error = t.pow(2).mean() - (outputs * t).mean(dim=0).pow(2) / outputs.pow(2).mean(dim=0).clamp_min(1e-30)
        floors.append(error.min().item())  # best beta for this query
    return statistics.mean(floors)


def wilson_interval(successes, trials, z=1.96):
    """Wilson score interval for a success rate (95% at z = 1.96): (low, high) in [0, 1].

    Unlike p ± z sqrt(p (1 - p) / n) it stays inside [0, 1] and is not empty at 0 or n successes.
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    p = successes / trials
    center = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, center - half), min(1.0, center + half)


def steps_to(curve, threshold):
    """First step at which the windowed training loss is at most threshold, or None."""
    values = [float(x) for x in curve.split()] if isinstance(curve, str) else list(curve)
    return next(((i + 1) * CURVE_EVERY for i, x in enumerate(values) if x <= threshold), None)


def _candidate_stats(runs, threshold, escape_threshold, dot, best, is_dot):
    """One candidate's measures on one task from its runs (rows sorted by seed); see summarize."""
    errors = [row["test_mse"] for row in runs]
    wins = [row for row in runs if row["test_mse"] <= threshold]
    # a run that passed on the test set but whose noisy training average never did counts as its last step
    reached = [steps_to(row["curve"], threshold) or row["steps"] for row in wins]
    escapes = None if escape_threshold is None else sum(e <= escape_threshold for e in errors)
    return {
        "errors": errors, "seeds_run": [row["seed"] for row in runs], "mean": statistics.mean(errors),
        "std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
        "successes": len(wins), "seeds": len(runs), "interval": wilson_interval(len(wins), len(runs)),
        "escapes": escapes,
        "escape_interval": None if escapes is None else wilson_interval(escapes, len(runs)),
        "distances": [e - best for e in errors], "median_distance": statistics.median(e - best for e in errors),
        "stalls": None if dot is None or is_dot else sum(e > dot for e in errors),
        "median_steps": statistics.median(reached) if reached else None,
    }


def summarize(rows, margin=0.05):
    """Per task and candidate: test MSE per seed, mean ± std, escapes, precision, median steps, and stalls.

    escape: test MSE <= ESCAPE_FACTOR x the best dot-product run's on the task ("escapes", with its Wilson 95%
    interval "escape_interval"; None without "dot" runs). Precision: "distances" to the best run on the task
    among all candidates, and "successes", the runs within the margin of it, with their Wilson interval
    "interval". A run stalls when it ends worse than the median dot-product run on its task (counted for the
    neural candidates when "dot" was run).
    Returns {task: {"best", "threshold", "dot" (median dot run), "dot_best", "escape_threshold" (None without dot),
    "candidates": {candidate: {...}}}}.
    """
    summary = {}
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        best = min(row["test_mse"] for row in task_rows)
        dot_errors = [row["test_mse"] for row in task_rows if row["candidate"] == "dot"]
        dot = statistics.median(dot_errors) if dot_errors else None
        dot_best = min(dot_errors) if dot_errors else None
        escape_threshold = None if dot_best is None else ESCAPE_FACTOR * dot_best
        per_candidate = {}
        for candidate in dict.fromkeys(row["candidate"] for row in task_rows):
            runs = sorted((row for row in task_rows if row["candidate"] == candidate), key=lambda row: row["seed"])
            per_candidate[candidate] = _candidate_stats(runs, best + margin, escape_threshold, dot, best,
                                                        candidate == "dot")
        summary[task] = {"best": best, "threshold": best + margin, "dot": dot, "dot_best": dot_best,
                         "escape_threshold": escape_threshold, "candidates": per_candidate}
    return summary


def _count(successes, trials, interval):
    return "-" if successes is None else f"{successes}/{trials} ({interval[0]:.2f}-{interval[1]:.2f})"


def format_table(summary):
    """The summary as a plain-text table, one line per (task, candidate), the held-out family apart."""
    lines = []
    for name in ("probes", "held-out", "other"):
        tasks = [task for task in summary if family(task) == name]
        if not tasks:
            continue
        if name == "held-out":
            lines.append("\nHeld-out family (reported apart, never tuned on):")
        lines.append(f"{'task':<12} {'candidate':<19} {'escaped (95% CI)':>17} {'within margin':>17} "
                     f"{'median steps':>12} {'stalled':>8} {'test MSE mean ± std':>20}  per seed")
        for task in tasks:
            entry = summary[task]
            for candidate, stats in entry["candidates"].items():
                steps = "-" if stats["median_steps"] is None else f"{stats['median_steps']:.0f}"
                stalls = "-" if stats["stalls"] is None else f"{stats['stalls']}/{stats['seeds']}"
                per_seed = " ".join(f"{e:.3f}" for e in stats["errors"])
                lines.append(f"{task:<12} {candidate:<19} "
                             f"{_count(stats['escapes'], stats['seeds'], stats['escape_interval']):>17} "
                             f"{_count(stats['successes'], stats['seeds'], stats['interval']):>17} {steps:>12} "
                             f"{stalls:>8} {stats['mean']:>11.3f} ± {stats['std']:.3f}  {per_seed}")
            escape = "" if entry["escape_threshold"] is None else (
                f"; escaped: test MSE <= {ESCAPE_FACTOR} x best dot run = {entry['escape_threshold']:.3f}"
                f"; stalled: worse than the median dot run, {entry['dot']:.3f}")
            lines.append(f"{'':<12} (within margin: test MSE <= best {entry['best']:.3f} + margin = "
                         f"{entry['threshold']:.3f}{escape})")
    return "\n".join(lines)


def summary_rows(summary):
    """The summary as CSV rows with SUMMARY_FIELDS, the per-seed test MSE space-separated in "errors"."""
    rows = []
    for task, entry in summary.items():
        for candidate, stats in entry["candidates"].items():
            escape_low, escape_high = stats["escape_interval"] or ("", "")
            rows.append({"family": family(task), "task": task, "candidate": candidate, "seeds": stats["seeds"],
                         "escapes": "" if stats["escapes"] is None else stats["escapes"],
                         "escape_low": escape_low, "escape_high": escape_high,
                         "within_margin": stats["successes"], "margin_low": stats["interval"][0],
                         "margin_high": stats["interval"][1],
                         "stalls": "" if stats["stalls"] is None else stats["stalls"],
                         "median_distance": stats["median_distance"],
                         "escape_threshold": "" if entry["escape_threshold"] is None else entry["escape_threshold"],
                         "threshold": entry["threshold"], "dot_median": "" if entry["dot"] is None else entry["dot"],
                         "errors": " ".join(f"{e:.5f}" for e in stats["errors"])})
    return rows


def plot_study(rows, summary, path):
    """Per task: test MSE of every seed per candidate (top) and the median training curve per candidate (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        top, bottom = axes[0, column], axes[1, column]
        candidates = list(summary[task]["candidates"])
        for x, candidate in enumerate(candidates):
            stats = summary[task]["candidates"][candidate]
            jitter = torch.linspace(-0.15, 0.15, len(stats["errors"])).tolist()
            top.scatter([x + j for j in jitter], stats["errors"], s=14, alpha=0.8)
            escaped = "-" if stats["escapes"] is None else stats["escapes"]
            top.annotate(f"{escaped}\n{stats['successes']}/{stats['seeds']}", (x, 1.0), ha="center", va="bottom",
                         xycoords=("data", "axes fraction"), fontsize=8)
            curves = [torch.tensor([float(v) for v in row["curve"].split()]) for row in rows
                      if row["task"] == task and row["candidate"] == candidate]
            median = torch.stack(curves).median(dim=0).values
            bottom.plot([(i + 1) * CURVE_EVERY for i in range(len(median))], median.tolist(), label=candidate)
        for axis in (top, bottom):
            axis.axhline(summary[task]["threshold"], color="gray", linestyle="--", linewidth=1)
            if summary[task]["escape_threshold"] is not None:
                axis.axhline(summary[task]["escape_threshold"], color="red", linestyle=":", linewidth=1)
            axis.set_yscale("log")
        top.set_xticks(range(len(candidates)), candidates, rotation=35, ha="right", fontsize=8)
        top.set_title(f"{task} ({family(task)})", fontsize=9, pad=24)
        top.set_ylabel("test MSE per seed (log)")
        bottom.set_xlabel("training step")
        bottom.set_ylabel("median training loss over seeds (log)")
    axes[1, 0].legend(fontsize=8)
    fig.suptitle("above each column: seeds escaped (below the red dotted line: half the best dot-product run)\n"
                 "and seeds within the margin (below the gray dashed line)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--seeds", type=int, default=10, help="seeds per task and candidate (default 10)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per run (default 1500)")
    parser.add_argument("--held-out", action="store_true",
                        help=f"run the held-out family ({' '.join(HELD_OUT)}) instead of the probes; it is "
                             "reported apart and never tuned on (docs/learnability.md, Protocol)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS),
                        help=f"tasks to run instead of a family (default the probes: {' '.join(PROBES)})")
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), choices=list(CANDIDATES),
                        help=f"score candidates (default {' '.join(DEFAULT_CANDIDATES)}); 'dot' is the dot-product "
                             "baseline, needed for the escape and stall measures")
    parser.add_argument("--margin", type=float, default=0.05, help="precision: test MSE <= task best + margin (0.05)")
    parser.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default 2)")
    parser.add_argument("--out", default="runs/learnability",
                        help="folder for results.csv (one row per run, both families; rerunning resumes), "
                             "summary.csv and results.png (--held-out: summary-held-out.csv, results-held-out.png)")


def _settings(steps):
    """The probe settings every run uses, read from train_run's and train_probe's defaults."""
    probe = {name: p.default for name, p in inspect.signature(train_probe).parameters.items()}
    proj_dim = inspect.signature(train_run).parameters["proj_dim"].default
    return (f"Adam {probe['lr']:g}, batch {probe['batch']}, head_dim {probe['head_dim']}, d' = {proj_dim}, "
            f"{steps} steps")


def main(args):
    start = time.perf_counter()
    out = Path(args.out)
    tasks = args.tasks or list(HELD_OUT if args.held_out else PROBES)
    rows = run_study(tasks, args.candidates, args.seeds, args.steps, csv_path=out / "results.csv",
                     workers=args.workers)
    summary = summarize(rows, args.margin)
    keys = ", ".join(f"{task} {task_keys(task)}" for task in tasks)
    print(f"\nOne attention head per run, {_settings(args.steps)}; keys: {keys}; test MSE per seed.")
    print(format_table(summary))
    suffix = "-held-out" if args.held_out and not args.tasks else ""  # the two families' summaries kept apart
    with open(out / f"summary{suffix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(summary_rows(summary))
    plot_study(rows, summary, out / f"results{suffix}.png")
    print(f"\nwrote {out / 'results.csv'}, {out / f'summary{suffix}.csv'} and {out / f'results{suffix}.png'} in "
          f"{time.perf_counter() - start:.0f} s with {args.workers} worker(s)")
