"""`python -m minina demo`: dot-product vs neural attention on the nearest-key task, a few seeds, on CPU."""
import argparse
import statistics
import time

import torch
from tqdm.auto import tqdm

from .probes import train_probe

HELP = "compare dot-product and neural attention on a task one dot-product head cannot express"


def _positive_int(text):
    """argparse type: an int of at least 1, else a message that says so."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def add_arguments(parser):
    parser.add_argument("--seeds", type=_positive_int, default=4, help="seeds per kind (default 4)")
    parser.add_argument("--steps", type=_positive_int, default=2500, help="Adam steps per run (default 2500)")
    parser.add_argument("--num-keys", type=_positive_int, default=8, help="keys per sequence (default 8)")
    parser.add_argument("--proj-dim", type=_positive_int, default=8, help="neural score projection d' (default 8)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads (default 1: the models are tiny, and more threads only fight over a busy "
                             "machine's cores)")


def run(seeds=4, steps=2500, num_keys=8, proj_dim=8):
    """Train both kinds on every seed; returns {kind: [test MSE per seed]}."""
    for name, value in (("seeds", seeds), ("steps", steps), ("num_keys", num_keys), ("proj_dim", proj_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    results = {}
    with tqdm(total=2 * seeds * steps, desc="demo", unit="step") as bar:
        for kind in ("dot", "neural"):
            results[kind] = [train_probe(kind, seed, steps=steps, num_keys=num_keys, proj_dim=proj_dim,
                                         progress=bar)["test_mse"] for seed in range(seeds)]
    return results


def main(args):
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args.seeds, args.steps, args.num_keys, args.proj_dim)
    print("\nNearest-key retrieval: the target is the value of the key closest to the query (test MSE, "
          "lower is better;\npredicting 0 scores 1.0). One dot-product head can only favour extreme keys.\n")
    print(f"{'attention':<10} {'per seed':<40} {'mean ± std':>16}")
    for kind, errors in results.items():
        per_seed = " ".join(f"{e:.3f}" for e in errors)
        spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
        print(f"{kind:<10} {per_seed:<40} {statistics.mean(errors):>8.3f} ± {spread:.3f}")
    floor = min(results["dot"])
    wins = sum(e < 0.5 * floor for e in results["neural"])
    threads = torch.get_num_threads()
    print(f"\nneural attention beat half the best dot-product error on {wins} of {len(results['neural'])} seeds; "
          f"where it did not, training stalled (notebook 04 shows why). {time.perf_counter() - start:.0f} s on "
          f"{threads} CPU thread{'s' if threads != 1 else ''}.")
