"""`python -m minina study-learnability`: which NeuralScore options make training find what the score can express.

Trains one attention head (tasks.AttentionProbe) per (task, variant, seed) and asks, per task, how many seeds reach
the task's best test error within a margin, and how fast. A run succeeds when its test MSE is at most
best + margin, best being the lowest test MSE of any run on that task; its steps to success are the first step
at which the training loss, averaged over a window of CURVE_EVERY steps, falls to that threshold.
Each finished run is appended to the CSV at once; rerunning the same command skips the runs already there.
"""
import csv
import math
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tasks import TASKS, train_probe

HELP = "success rate over seeds of NeuralScore training options on probe tasks (CSV, table, plot)"

# The protocol, written down before any held-out result existed (README "Training reliably", Protocol).
# Options are chosen on PROBES only. HELD_OUT is a second family of non-affine attention patterns of other shapes
# and sizes, reported apart and never tuned on. Both map task -> number of keys; every run is one AttentionProbe,
# Adam 3e-3, batch 256, head_dim 16, d' = 8, 1,500 steps. Per task, with the dot-product runs on the same seeds:
# - escape: test MSE <= ESCAPE_FACTOR x the best dot-product run's (beating the floor no dot head passes);
# - precision: test MSE - the best run among all variants run together (a count: within the margin, 0.05);
# - stall: test MSE > the median dot-product run.
# dot_floor_estimate gives each task's floor from its data alone, without training, as a check on the dot runs.
PROBES = {"nearest_key": 8, "ring_key": 8, "nearest_2d": 8, "extreme_key": 8}
HELD_OUT = {"ball_mean": 16, "annulus_2d": 12, "k_nearest": 16, "nearest_3d": 12}
ESCAPE_FACTOR = 0.5

# variant -> score_options for NeuralScore; None is the dot-product baseline
VARIANTS = {
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
}
# what the command runs by default: the variants kept for continuity, "wide" and the recommended "wide+gelu"
# (README "Training reliably"); the other candidates (leaky, bias, residual) and learn_scale run with --variants
DEFAULT_VARIANTS = ("dot", "paper", "kaiming", "gelu", "wide", "wide+gelu")
CURVE_EVERY = 50  # training-loss curve resolution (steps) kept in the CSV
FIELDS = ["task", "variant", "seed", "steps", "num_keys", "proj_dim", "test_mse", "seconds", "curve"]


def train_run(task, variant, seed, steps=1500, num_keys=8, proj_dim=8):
    """Train one probe of a VARIANTS entry on a TASKS entry; returns (CSV row with FIELDS, trained model)."""
    start = time.perf_counter()
    kind = "dot" if VARIANTS[variant] is None else "neural"
    result = train_probe(kind, seed, steps=steps, num_keys=num_keys, proj_dim=proj_dim,
                         score_options=VARIANTS[variant], task=task)
    losses = torch.tensor(result["losses"])
    curve = losses[: steps - steps % CURVE_EVERY].view(-1, CURVE_EVERY).mean(dim=1)  # (steps // CURVE_EVERY,)
    row = {"task": task, "variant": variant, "seed": seed, "steps": steps, "num_keys": num_keys,
           "proj_dim": proj_dim, "test_mse": result["test_mse"], "seconds": time.perf_counter() - start,
           "curve": " ".join(f"{x:.5f}" for x in curve.tolist())}
    return row, result["model"]


def _train_in_worker(job):
    torch.set_num_threads(1)
    return train_run(*job)[0]


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in ("seed", "steps", "num_keys", "proj_dim"):
            row[key] = int(row[key])
        row["test_mse"], row["seconds"] = float(row["test_mse"]), float(row["seconds"])
    return rows


def run_study(tasks=tuple(TASKS), variants=DEFAULT_VARIANTS, seeds=10, steps=1500, num_keys=8, proj_dim=8,
              csv_path=None, workers=2, progress=True):
    """Train every (task, variant, seed); returns the rows (dicts with FIELDS).

    csv_path: append each finished run there and reuse the matching runs it already holds. workers > 1 trains
    runs in a process pool; every run uses one thread (these probes are too small to gain from more, and on a
    busy machine several threads per tiny op thrash).
    """
    unknown = [t for t in tasks if t not in TASKS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown tasks/variants {unknown}; tasks: {sorted(TASKS)}, variants: {list(VARIANTS)}")
    if seeds < 1 or steps < CURVE_EVERY or workers < 1:
        raise ValueError(f"need seeds >= 1, steps >= {CURVE_EVERY}, workers >= 1; got {seeds}, {steps}, {workers}")
    # seeds outermost, so an interrupted study holds the same seeds for every task and variant
    jobs = [(t, v, s, steps, num_keys, proj_dim) for s in range(seeds) for t in tasks for v in variants]
    done = {}
    if csv_path is not None and Path(csv_path).exists():
        for row in _read_csv(csv_path):
            done[tuple(row[k] for k in FIELDS[:6])] = row
    rows = [done[job] for job in jobs if job in done]
    todo = [job for job in jobs if job not in done]
    writer = None
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        new_file = not Path(csv_path).exists()
        handle = open(csv_path, "a", newline="")
        writer = csv.DictWriter(handle, FIELDS)
        if new_file:
            writer.writeheader()
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


def summarize(rows, margin=0.05):
    """Per task and variant: test MSE per seed, mean ± std, success rate, median steps to success, and stalls.

    A run stalls when it ends worse than the median dot-product run on its task (counted for the neural variants
    when "dot" was run).
    Each variant also gets the Wilson 95% interval of its success rate ("interval").
    Returns {task: {"best": float, "threshold": float, "dot": float or None, "variants": {variant: {...}}}}.
    """
    summary = {}
    for task in dict.fromkeys(row["task"] for row in rows):
        task_rows = [row for row in rows if row["task"] == task]
        best = min(row["test_mse"] for row in task_rows)
        threshold = best + margin
        dot = [row["test_mse"] for row in task_rows if row["variant"] == "dot"]
        dot = statistics.median(dot) if dot else None
        per_variant = {}
        for variant in dict.fromkeys(row["variant"] for row in task_rows):
            runs = sorted((row for row in task_rows if row["variant"] == variant), key=lambda row: row["seed"])
            errors = [row["test_mse"] for row in runs]
            wins = [row for row in runs if row["test_mse"] <= threshold]
            # a run that passed on the test set but whose noisy training average never did counts as its last step
            reached = [steps_to(row["curve"], threshold) or row["steps"] for row in wins]
            per_variant[variant] = {
                "errors": errors, "mean": statistics.mean(errors),
                "std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "successes": len(wins), "seeds": len(runs), "interval": wilson_interval(len(wins), len(runs)),
                "stalls": None if dot is None or variant == "dot" else sum(e > dot for e in errors),
                "median_steps": statistics.median(reached) if reached else None,
            }
        summary[task] = {"best": best, "threshold": threshold, "dot": dot, "variants": per_variant}
    return summary


def format_table(summary):
    """The summary as a plain-text table, one line per (task, variant)."""
    lines = [f"{'task':<12} {'variant':<14} {'success':>8} {'95% interval':>13} {'median steps':>13} {'stalled':>8} "
             f"{'test MSE mean ± std':>20}  per seed"]
    for task, entry in summary.items():
        for variant, stats in entry["variants"].items():
            steps = "-" if stats["median_steps"] is None else f"{stats['median_steps']:.0f}"
            stalls = "-" if stats["stalls"] is None else f"{stats['stalls']}/{stats['seeds']}"
            per_seed = " ".join(f"{e:.3f}" for e in stats["errors"])
            low, high = stats["interval"]
            lines.append(f"{task:<12} {variant:<14} {stats['successes']:>4}/{stats['seeds']:<3} "
                         f"{f'{low:.2f}-{high:.2f}':>13} {steps:>13} "
                         f"{stalls:>8} {stats['mean']:>11.3f} ± {stats['std']:.3f}  {per_seed}")
        dot = "" if entry["dot"] is None else f"; stalled: worse than the median dot run, {entry['dot']:.3f}"
        lines.append(f"{'':<12} (success: test MSE <= best {entry['best']:.3f} + margin = {entry['threshold']:.3f}"
                     f"{dot})")
    return "\n".join(lines)


def plot_study(rows, summary, path):
    """Per task: test MSE of every seed per variant (top) and the median training curve per variant (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        top, bottom = axes[0, column], axes[1, column]
        variants = list(summary[task]["variants"])
        for x, variant in enumerate(variants):
            stats = summary[task]["variants"][variant]
            jitter = torch.linspace(-0.15, 0.15, len(stats["errors"])).tolist()
            top.scatter([x + j for j in jitter], stats["errors"], s=14, alpha=0.8)
            top.annotate(f"{stats['successes']}/{stats['seeds']}", (x, 1.0), ha="center", va="bottom",
                         xycoords=("data", "axes fraction"), fontsize=8)
            curves = [torch.tensor([float(v) for v in row["curve"].split()]) for row in rows
                      if row["task"] == task and row["variant"] == variant]
            median = torch.stack(curves).median(dim=0).values
            bottom.plot([(i + 1) * CURVE_EVERY for i in range(len(median))], median.tolist(), label=variant)
        for axis in (top, bottom):
            axis.axhline(summary[task]["threshold"], color="gray", linestyle="--", linewidth=1)
            axis.set_yscale("log")
        top.set_xticks(range(len(variants)), variants, rotation=35, ha="right", fontsize=8)
        top.set_title(f"{task}\n(success rate above each column)", fontsize=9, pad=14)
        top.set_ylabel("test MSE per seed (log)")
        bottom.set_xlabel("training step")
        bottom.set_ylabel("median training loss over seeds (log)")
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser):
    parser.add_argument("--seeds", type=int, default=10, help="seeds per task and variant (default 10)")
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps per run (default 1500)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="probe tasks (default all)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS),
                        help=f"score variants (default {' '.join(DEFAULT_VARIANTS)}); 'dot' is the dot-product "
                             "baseline")
    parser.add_argument("--margin", type=float, default=0.05, help="success: test MSE <= task best + margin (0.05)")
    parser.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default 2)")
    parser.add_argument("--out", default="runs/learnability", help="folder for results.csv and results.png")


def main(args):
    start = time.perf_counter()
    out = Path(args.out)
    rows = run_study(args.tasks, args.variants, args.seeds, args.steps, csv_path=out / "results.csv",
                     workers=args.workers)
    summary = summarize(rows, args.margin)
    print("\nOne attention head per run, Adam 3e-3, batch 256, 8 keys, d' = 8; test MSE (predicting 0 scores 1.0).")
    print(format_table(summary))
    plot_study(rows, summary, out / "results.png")
    print(f"\nwrote {out / 'results.csv'} and {out / 'results.png'} in {time.perf_counter() - start:.0f} s "
          f"with {args.workers} worker(s)")
