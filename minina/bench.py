"""`python -m minina bench`: time and peak memory of one attention forward+backward, per backend and length N.

Method. Every (backend, N) case runs in a fresh Python process, so no case inherits another's allocations.
Inside it: build q, k, v (B, H, N, E) with requires_grad, the NeuralScore and a fixed output gradient; run the
backend once at N=16 so one-time library set-up is not counted; reset the peak counter; run forward+backward
once; peak extra memory = peak - memory in use at the reset. It includes the output and the input gradients.
- CUDA: torch.cuda.reset_peak_memory_stats and max_memory_allocated - memory_allocated (exact tensor bytes).
- CPU: PyTorch's CPU allocator keeps no peak counter and tracemalloc does not see its allocations, so we read
  the process's resident set: writing "5" to /proc/self/clear_refs resets the kernel's high-water mark VmHWM to
  the current VmRSS (Linux >= 4.0), and peak = VmHWM. Pages the C allocator keeps after a free are counted, so
  this can overstate live bytes slightly, never understate them. Without /proc (macOS) the fallback is the
  ru_maxrss delta, which reads 0 when the run stays below an earlier peak of the process.
Time: the median wall-clock time of up to `repeats` further forward+backward runs, fewer once the case has
run TIME_BUDGET_S (synchronized on CUDA); the measured run's time if there are none.
"""
import csv
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention import neural_attention
from .scores import NeuralScore

HELP = "time and peak memory of reference, chunked (and triton on GPU) neural attention against SDPA"


def _sdpa(q, k, v, score, is_causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _neural(q, k, v, score, is_causal, backend):
    return neural_attention(q, k, v, score, is_causal=is_causal, backend=backend)


# name -> (attention(q, k, v, score, is_causal), device types it runs on); "sdpa" is the dot-product baseline
BACKENDS = {
    "sdpa": (_sdpa, ("cpu", "cuda")),
    "reference": (functools.partial(_neural, backend="reference"), ("cpu", "cuda")),
    "chunked": (functools.partial(_neural, backend="chunked"), ("cpu", "cuda")),
    "triton": (functools.partial(_neural, backend="triton"), ("cuda",)),
}
DEFAULT_MAX_N = {"reference": 2048}  # its (B, H, N, N, 2P) pair tensor takes ~6 GB at N=4096 with our defaults
MIB = 2 ** 20
TIME_BUDGET_S = 2.0  # no further timed runs once a case has run this long


def _read_proc_status(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _reset_peak(device):
    """Reset the peak-memory counter of device; returns the bytes in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        return _read_proc_status("VmRSS")
    except OSError:
        return _max_rss()


def _read_peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        return _read_proc_status("VmHWM")
    except OSError:
        return _max_rss()


def _max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(backend, n, device="cpu", dtype="float32", batch=1, heads=8, head_dim=64, proj_dim=2, causal=True,
            repeats=3, threads=None, seed=0):
    """One case in this process: {"time_s", "peak_mib"} of one forward+backward (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    device, dtype = torch.device(device), getattr(torch, dtype)
    torch.manual_seed(seed)
    attention = BACKENDS[backend][0]
    score = NeuralScore(head_dim, proj_dim).to(device, dtype)
    leaves = list(score.parameters())

    def inputs(length):
        q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # (B, H, N, E)
        return q, k, v, torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)

    def forward_backward(q, k, v, grad_out):
        for leaf in (q, k, v, *leaves):
            leaf.grad = None
        attention(q, k, v, score, causal).backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward_backward(*inputs(16))  # library set-up (thread pools, kernels) is not part of the measurement
    tensors = inputs(n)
    in_use = _reset_peak(device)
    start = time.perf_counter()
    forward_backward(*tensors)
    times = [time.perf_counter() - start]
    peak = _read_peak(device) - in_use
    for _ in range(repeats):
        if sum(times) > TIME_BUDGET_S:
            break
        start = time.perf_counter()
        forward_backward(*tensors)
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times[1:] or times), "peak_mib": peak / MIB}


def measure_in_fresh_process(**case):
    """measure(**case) in a new Python process; raises RuntimeError with its stderr if it fails."""
    code = "import json, sys; from minina.bench import measure; print(json.dumps(measure(**json.loads(sys.argv[1]))))"
    result = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(ns=(256, 512, 1024, 2048, 4096), device="cpu", dtype=torch.float32, backends=None, batch=1, heads=8,
              head_dim=64, proj_dim=2, causal=True, repeats=3, threads=None, max_n=None, progress=print):
    """Time and peak extra memory of one forward+backward for each backend and N; returns a list of dict rows.

    backends: names from BACKENDS (default: all that run on device); max_n: {backend: largest N to run}
    (default DEFAULT_MAX_N). Each row: backend, n, time_s, peak_mib, time_vs_sdpa, memory_vs_sdpa (None
    without an sdpa row at that N) and the settings. progress(text) is called once per case.
    """
    if not ns or any(not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"ns must be a non-empty list of positive ints, got {ns!r}")
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    backends = [name for name, (_, devices) in BACKENDS.items() if device.type in devices] if backends is None \
        else list(backends)
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise ValueError(f"backends must be names from {sorted(BACKENDS)}, got {unknown}")
    max_n = DEFAULT_MAX_N if max_n is None else max_n
    settings = dict(device=str(device), dtype=dtype_name, batch=batch, heads=heads, head_dim=head_dim,
                    proj_dim=proj_dim, causal=causal, threads=threads or torch.get_num_threads())
    rows = []
    for n in ns:
        for backend in backends:
            if n > max_n.get(backend, n):
                continue
            if progress:
                progress(f"  {backend} N={n} ...")
            figures = measure_in_fresh_process(backend=backend, n=n, repeats=repeats, **settings)
            rows.append({"backend": backend, "n": n, **figures, **settings})
    sdpa = {row["n"]: row for row in rows if row["backend"] == "sdpa"}
    for row in rows:
        base = sdpa.get(row["n"])
        row["time_vs_sdpa"] = row["time_s"] / base["time_s"] if base else None
        row["memory_vs_sdpa"] = row["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else None
    return rows


def _ratio(value):
    return "" if value is None else f"{value:.2f}"


def format_table(rows):
    """The rows as a Markdown table with ratios against SDPA."""
    lines = ["| backend | N | time (ms) | peak extra memory (MiB) | time / SDPA | memory / SDPA |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['backend']} | {row['n']} | {1000 * row['time_s']:.1f} | {row['peak_mib']:.1f} | "
                     f"{_ratio(row['time_vs_sdpa'])} | {_ratio(row['memory_vs_sdpa'])} |")
    return "\n".join(lines)


def summarize(rows):
    """Lines comparing chunked with the reference at the largest shared N, and memory growth per doubling of N."""
    by_key = {(row["backend"], row["n"]): row for row in rows}
    lines = []
    shared = [n for backend, n in by_key if backend == "chunked" and ("reference", n) in by_key]
    if shared:
        n = max(shared)
        chunked, reference = by_key[("chunked", n)], by_key[("reference", n)]
        lines.append(f"at N={n}: chunked uses {reference['peak_mib'] / chunked['peak_mib']:.1f}x less memory than "
                     f"the reference and takes {chunked['time_s'] / reference['time_s']:.2f}x its time")
    for backend in dict.fromkeys(row["backend"] for row in rows):
        doublings = [(n, by_key[(backend, n)], by_key[(backend, 2 * n)]) for b, n in by_key
                     if b == backend and (backend, 2 * n) in by_key]
        if doublings:
            n, small, large = max(doublings, key=lambda item: item[0])
            lines.append(f"{backend}: peak memory x{large['peak_mib'] / small['peak_mib']:.2f}, time "
                         f"x{large['time_s'] / small['time_s']:.2f} from N={n} to N={2 * n}")
    return lines


def write_csv(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows, path):
    """Log-log plot of time and peak extra memory against N, one line per backend, saved as PNG at path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(row["backend"] for row in rows):
        own = [row for row in rows if row["backend"] == backend]
        ns = [row["n"] for row in own]
        time_axis.plot(ns, [row["time_s"] for row in own], "o-", label=backend)
        memory_axis.plot(ns, [max(row["peak_mib"], 1e-2) for row in own], "o-", label=backend)  # log needs > 0
    first = rows[0]
    for axis, label in ((time_axis, "forward + backward time (s)"), (memory_axis, "peak extra memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"B={first['batch']}, H={first['heads']}, head_dim={first['head_dim']}, d'={first['proj_dim']}, "
                    f"{'causal' if first['causal'] else 'full'}, {first['dtype']}, {first['device']}, "
                    f"{first['threads']} CPU thread(s)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser):
    parser.add_argument("--ns", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096],
                        help="sequence lengths (default 256 512 1024 2048 4096)")
    parser.add_argument("--backends", nargs="+", choices=sorted(BACKENDS), default=None,
                        help="default: every backend that runs on --device")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=2, help="d' of the neural score (default 2, the paper's)")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full instead of causal attention")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the measured one (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    parser.add_argument("--reference-max-n", type=int, default=DEFAULT_MAX_N["reference"],
                        help="skip the reference above this N (default %(default)s)")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.csv and bench.png")


def main(args):
    start = time.perf_counter()
    rows = benchmark(args.ns, args.device, getattr(torch, args.dtype), args.backends, args.batch, args.heads,
                     args.head_dim, args.proj_dim, args.causal, args.repeats, args.threads,
                     {"reference": args.reference_max_n})
    out = Path(args.out)
    write_csv(rows, out / "bench.csv")
    plot(rows, out / "bench.png")
    first = rows[0]
    print(f"\nOne forward+backward, B={args.batch}, H={args.heads}, head_dim={args.head_dim}, d'={args.proj_dim}, "
          f"{'causal' if args.causal else 'full'}, {args.dtype}, {first['device']}, {first['threads']} CPU thread(s); "
          "each case in a fresh process (method: python -c 'import minina.bench; help(minina.bench)').\n")
    print(format_table(rows))
    print("\n" + "\n".join(summarize(rows)))
    print(f"\nwrote {out / 'bench.csv'} and {out / 'bench.png'} in {time.perf_counter() - start:.0f} s")
