"""`python -m minina bench`: time and peak memory of one attention forward+backward (or forward), per backend and N.

Method. Every (backend, pass, N) case runs in a fresh Python process, so no case inherits another's allocations.
Inside it: build q, k, v (B, H, N, E) with requires_grad, the NeuralScore and a fixed output gradient; run the
backend once at N=16 so one-time library set-up is not counted (compiled at min(N, 256), which compiles the
block size N uses; triton also once at N: it autotunes per shape);
reset the peak counter; run the pass once; peak extra memory = peak - memory in use at the reset. A "fwd+bwd" pass
is forward then backward, and its peak includes the output and the input gradients; a "fwd" pass is the forward
alone under torch.no_grad (inference).
- CUDA: torch.cuda.reset_peak_memory_stats and max_memory_allocated - memory_allocated (exact tensor bytes).
- CPU: PyTorch's CPU allocator keeps no peak counter and tracemalloc does not see its allocations, so we read
  the process's resident set. On Linux the kernel keeps its high-water mark: writing "5" to /proc/self/clear_refs
  resets VmHWM to the current VmRSS (Linux >= 4.0), and peak = VmHWM, exact. Pages the C allocator keeps after a
  free are counted, so this can overstate live bytes slightly, never understate them. Elsewhere (macOS, Windows)
  a thread reads the resident set through psutil every SAMPLE_INTERVAL_S during the run and keeps the largest,
  which can miss a peak shorter than the interval.
Time: the median wall-clock time of up to `repeats` further runs of the pass, fewer once the case has run
TIME_BUDGET_S (synchronized on CUDA); the measured run's time if there are none.

`--check` (CUDA only) is the one GPU script: it runs the kernels' self-test shipped in the package,
minina.tools.triton_check (every kernel config, fp32, fp16 and bf16 against the float64 reference, the flash-attention
error rule), and, if every check passes, the table of SDPA, triton and chunked for N = 1k..16k, forward and
forward+backward.
"""
import argparse
import csv
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..attention import neural_attention
from ..scores import NeuralScore

HELP = "time and peak memory of reference, chunked, compiled (and triton on GPU) neural attention against SDPA"


def _sdpa(q, k, v, score, is_causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _neural(q, k, v, score, is_causal, backend):
    return neural_attention(q, k, v, score, is_causal=is_causal, backend=backend)


# name -> (attention(q, k, v, score, is_causal), device types it runs on); "sdpa" is the dot-product baseline
CONTENDERS = {
    "sdpa": (_sdpa, ("cpu", "cuda")),
    "reference": (functools.partial(_neural, backend="reference"), ("cpu", "cuda")),
    "chunked": (functools.partial(_neural, backend="chunked"), ("cpu", "cuda")),
    "compiled": (functools.partial(_neural, backend="compiled"), ("cpu",)),
    "triton": (functools.partial(_neural, backend="triton"), ("cuda",)),
}
DEFAULT_MAX_N = {"reference": 2048}  # its (B, H, N, N, 2P) pair tensor grows as N^2
MIB = 2 ** 20
TIME_BUDGET_S = 2.0  # no further timed runs once a case has run this long
PASSES = ("fwd", "fwd+bwd")
TUNED_PER_SHAPE = ("triton",)  # backends whose first call at a new N autotunes: warmed up at N too
WARM_UP_N = {"compiled": 256}  # compiles per block size, the same for every N >= 256: warmed up at min(N, 256)
CHECK_NS = (1024, 2048, 4096, 8192, 16384)
CHECK_BACKENDS = ("sdpa", "triton", "chunked")
PROC_SELF = Path("/proc/self")  # Linux: the kernel's own peak of the resident set
SAMPLE_INTERVAL_S = 0.001  # elsewhere: how often the resident set is read


class _PeakMemory:
    """Peak memory of one run on device: start() resets the counter and returns the bytes in use, stop() the peak
    since (see the module docstring for the method on each device and OS)."""

    def __init__(self, device):
        self.device, self.process, self.sampler, self.done, self.peak = device, None, None, threading.Event(), 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        try:
            (PROC_SELF / "clear_refs").write_text("5")  # VmHWM := VmRSS
            return _read_proc_status("VmRSS")
        except OSError:  # no /proc: sample the resident set instead
            import psutil  # only this fallback (macOS, Windows) needs it

            self.process = psutil.Process()
            self.peak = in_use = self.process.memory_info().rss
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
            return in_use

    def _sample(self):
        while not self.done.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.sampler is None:
            return _read_proc_status("VmHWM")
        self.done.set()
        self.sampler.join()
        return max(self.peak, self.process.memory_info().rss)


def _read_proc_status(field):
    with open(PROC_SELF / "status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _prepared(backend, n, device, dtype, batch, heads, head_dim, proj_dim, is_causal, seed, pass_):
    """A function that runs one pass_ of backend at N=n, once warmed up (see the module docstring)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    torch.manual_seed(seed)
    attention = CONTENDERS[backend][0]
    score = NeuralScore(head_dim, proj_dim).to(device, dtype)
    leaves = list(score.parameters())

    def inputs(length):
        q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))  # (B, H, N, E)
        return q, k, v, torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)

    def run(q, k, v, grad_out):
        for leaf in (q, k, v, *leaves):
            leaf.grad = None
        if pass_ == "fwd":
            with torch.no_grad():
                attention(q, k, v, score, is_causal)
        else:
            attention(q, k, v, score, is_causal).backward(grad_out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(*inputs(min(n, WARM_UP_N[backend]) if backend in WARM_UP_N else 16))  # library set-up, compiling: not measured
    tensors = inputs(n)
    if backend in TUNED_PER_SHAPE:
        run(*tensors)  # nor is autotuning for this shape
    return lambda: run(*tensors)


def measure(backend, n, device="cpu", dtype="float32", batch=1, heads=8, head_dim=64, proj_dim=2, is_causal=True,
            repeats=3, threads=None, seed=0, pass_="fwd+bwd"):
    """One case in this process: {"time_s", "peak_mib"} of one pass_ (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    device, dtype = torch.device(device), getattr(torch, dtype)
    run = _prepared(backend, n, device, dtype, batch, heads, head_dim, proj_dim, is_causal, seed, pass_)
    memory = _PeakMemory(device)
    in_use = memory.start()
    start = time.perf_counter()
    run()
    times = [time.perf_counter() - start]
    peak = memory.stop() - in_use
    for _ in range(repeats):
        if sum(times) > TIME_BUDGET_S:
            break
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times[1:] or times), "peak_mib": peak / MIB}


def measure_alternating(backends, n, device="cpu", dtype="float32", batch=1, heads=8, head_dim=64, proj_dim=2,
                        is_causal=True, repeats=3, threads=None, seed=0, pass_="fwd+bwd"):
    """The backends' cases in this one process, taking turns: each is prepared (warmed up), then `repeats` rounds
    run each backend once in order. {backend: {"time_s": median, "rounds": [seconds per round]}}; no memory (the
    allocator's pages are shared by the backends here)."""
    if threads:
        torch.set_num_threads(threads)
    device, dtype = torch.device(device), getattr(torch, dtype)
    runs = {backend: _prepared(backend, n, device, dtype, batch, heads, head_dim, proj_dim, is_causal, seed, pass_)
            for backend in backends}
    rounds = {backend: [] for backend in backends}
    for _ in range(max(repeats, 1)):
        for backend, run in runs.items():
            start = time.perf_counter()
            run()
            rounds[backend].append(time.perf_counter() - start)
    return {backend: {"time_s": statistics.median(times), "rounds": times} for backend, times in rounds.items()}


def measure_in_fresh_process(function="measure", **case):
    """measure(**case) (or measure_alternating) in a new Python process; raises RuntimeError with its stderr if it
    fails."""
    code = (f"import json, sys; from minina.tools.bench import {function}; "
            f"print(json.dumps({function}(**json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(ns=(256, 512, 1024, 2048, 4096), device="cpu", dtype=torch.float32, backends=None, batch=1, heads=8,
              head_dim=64, proj_dim=2, is_causal=True, repeats=3, threads=None, max_n=None, progress=print,
              passes=("fwd+bwd",), rounds=1, same_process=False):
    """Time and peak extra memory of one pass for each backend, pass and N; returns a list of dict rows.

    backends: names from CONTENDERS (default: all that run on device); max_n: {backend: largest N to run}
    (default DEFAULT_MAX_N); passes: from PASSES. Each case runs in a fresh process, `rounds` times, the backends
    taking turns (round 1 runs every case, then round 2 ...); with same_process, the backends of one (pass, N) take
    turns inside one process for `repeats` rounds instead, and no memory is measured. Each row: backend, pass, n,
    time_s and peak_mib (medians over rounds), time_vs_sdpa and memory_vs_sdpa (the median of each round's own
    ratio; None without an sdpa case), method and the settings. progress(text) is called once per process started.
    """
    if not ns or any(not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"ns must be a non-empty list of positive ints, got {ns!r}")
    if not passes or any(pass_ not in PASSES for pass_ in passes):
        raise ValueError(f"passes must be a non-empty list from {PASSES}, got {passes!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    device = torch.device(device)
    dtype_name = str(dtype).removeprefix("torch.")
    backends = [name for name, (_, devices) in CONTENDERS.items() if device.type in devices] if backends is None \
        else list(backends)
    unknown = [name for name in backends if name not in CONTENDERS]
    if unknown:
        raise ValueError(f"backends must be names from {sorted(CONTENDERS)}, got {unknown}")
    max_n = DEFAULT_MAX_N if max_n is None else max_n
    settings = dict(device=str(device), dtype=dtype_name, batch=batch, heads=heads, head_dim=head_dim,
                    proj_dim=proj_dim, is_causal=is_causal, threads=threads or torch.get_num_threads())
    cases = [(pass_, n, backend) for pass_ in passes for n in ns for backend in backends if n <= max_n.get(backend, n)]
    measured = {case: [] for case in cases}  # (pass, n, backend) -> one {"time_s", "peak_mib"} per round
    for round_ in range(rounds):
        if same_process:
            for pass_, n in dict.fromkeys((pass_, n) for pass_, n, _ in cases):
                names = [backend for p, m, backend in cases if (p, m) == (pass_, n)]
                if progress:
                    progress(f"  {' / '.join(names)} {pass_} N={n}, taking turns in one process ...")
                figures = measure_in_fresh_process("measure_alternating", backends=names, n=n, repeats=repeats,
                                                   pass_=pass_, **settings)
                for backend in names:
                    measured[(pass_, n, backend)] += [{"time_s": t, "peak_mib": None}
                                                      for t in figures[backend]["rounds"]]
            break  # one process holds every round
        for pass_, n, backend in cases:
            if progress:
                progress(f"  {backend} {pass_} N={n}{f' (round {round_ + 1} of {rounds})' if rounds > 1 else ''} ...")
            measured[(pass_, n, backend)].append(measure_in_fresh_process(backend=backend, n=n, repeats=repeats,
                                                                          pass_=pass_, **settings))
    method = "one process, backends taking turns" if same_process else "a fresh process per case"
    rows = []
    for (pass_, n, backend), figures in measured.items():
        base = measured.get((pass_, n, "sdpa"))
        peaks = [f["peak_mib"] for f in figures if f["peak_mib"] is not None]
        time_ratios = [f["time_s"] / b["time_s"] for f, b in zip(figures, base)] if base else []
        memory_ratios = [f["peak_mib"] / b["peak_mib"] for f, b in zip(figures, base)
                         if f["peak_mib"] is not None and b["peak_mib"]] if base else []
        rows.append({"backend": backend, "pass": pass_, "n": n,
                     "time_s": statistics.median(f["time_s"] for f in figures),
                     "peak_mib": statistics.median(peaks) if peaks else None,
                     "time_vs_sdpa": statistics.median(time_ratios) if time_ratios else None,
                     "memory_vs_sdpa": statistics.median(memory_ratios) if memory_ratios else None,
                     "rounds": len(figures), "method": method, **settings})
    return rows


def _ratio(value):
    return "" if value is None else f"{value:.2f}"


def timing_table(rows):
    """The rows as a Markdown table with ratios against SDPA; a pass column when the rows hold more than one."""
    several = len({row.get("pass", "fwd+bwd") for row in rows}) > 1
    pass_header, pass_rule = ("pass | ", "--- | ") if several else ("", "")
    lines = [f"| backend | {pass_header}N | time (ms) | peak extra memory (MiB) | time / SDPA | memory / SDPA |",
             f"| --- | {pass_rule}---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        pass_cell = f"{row['pass']} | " if several else ""
        peak = "" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        lines.append(f"| {row['backend']} | {pass_cell}{row['n']} | {1000 * row['time_s']:.1f} | "
                     f"{peak} | {_ratio(row['time_vs_sdpa'])} | {_ratio(row['memory_vs_sdpa'])} |")
    return "\n".join(lines)


def growth_summary(rows):
    """Lines comparing chunked with the reference at the largest shared N, and memory growth per doubling of N,
    from the forward+backward rows (all rows if there are none)."""
    rows = [row for row in rows if row.get("pass", "fwd+bwd") == "fwd+bwd"] or rows
    rows = [row for row in rows if row["peak_mib"] is not None]
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

    memory = all(row["peak_mib"] is not None for row in rows)  # measured in fresh processes only
    figure, axes = plt.subplots(1, 2 if memory else 1, figsize=(10 if memory else 6, 4), squeeze=False)
    time_axis, memory_axis = axes[0][0], axes[0][-1] if memory else None
    passes = list(dict.fromkeys(row.get("pass", "fwd+bwd") for row in rows))
    for backend, pass_ in dict.fromkeys((row["backend"], row.get("pass", "fwd+bwd")) for row in rows):
        own = [row for row in rows if row["backend"] == backend and row.get("pass", "fwd+bwd") == pass_]
        ns = [row["n"] for row in own]
        label, style = (f"{backend} {pass_}", "o-" if pass_ == "fwd+bwd" else "s--") if len(passes) > 1 \
            else (backend, "o-")
        time_axis.plot(ns, [row["time_s"] for row in own], style, label=label)
        if memory:
            memory_axis.plot(ns, [max(row["peak_mib"], 1e-2) for row in own], style, label=label)  # log needs > 0
    first = rows[0]
    time_label = {("fwd+bwd",): "forward + backward time (s)", ("fwd",): "forward time (s)"}.get(tuple(passes),
                                                                                                 "time (s)")
    for axis, label in ((time_axis, time_label), (memory_axis, "peak extra memory (MiB)"))[:2 if memory else 1]:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"B={first['batch']}, H={first['heads']}, head_dim={first['head_dim']}, d'={first['proj_dim']}, "
                    f"{'causal' if first['is_causal'] else 'full'}, {first['dtype']}, {first['device']}, "
                    f"{first['threads']} CPU thread(s)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_markdown(rows, path, description):
    """description, the Markdown table and the summary lines, saved at path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{description}\n\n{timing_table(rows)}\n\n" + "\n".join(growth_summary(rows)) + "\n")


def require_cuda(device, check=False):
    """--device cuda (and --check, which needs it) where no CUDA GPU can run it: argparse.ArgumentError saying so."""
    if check and torch.device(device).type != "cuda":
        raise argparse.ArgumentError(None, f"--check runs the Triton kernels on a CUDA GPU, but got --device "
                                           f"{device}; run it on a GPU machine with --device cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentError(None, f"--device {device} needs a CUDA GPU, but torch.cuda.is_available() is "
                                           "False here (no NVIDIA GPU or driver, or a CPU-only PyTorch); run it on a "
                                           "GPU machine, or leave out --device for the CPU table")
    if check and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise argparse.ArgumentError(None, "--check compiles the Triton kernels for the GPU, but TRITON_INTERPRET is "
                                           "set: unset it (the interpreter runs them on the CPU)")


def run_self_test(device, out):
    """minina.tools.triton_check on device, one line per check printed and saved in out/check.txt; True if all
    passed."""
    from .triton_check import run_checks

    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "check.txt", "w") as log:
        def progress(line):
            print(f"  {line}", flush=True)
            log.write(line + "\n")

        passed, failures = run_checks(device, progress=progress)
        for name, text in failures:
            log.write(f"\n--- {name} ---\n{text}")
        summary = f"{passed} passed, {len(failures)} failed"
        log.write(summary + "\n")
    print(f"  {summary} (log in {Path(out) / 'check.txt'})")
    return not failures


def add_arguments(parser):
    parser.add_argument("--ns", type=int, nargs="+", default=None,
                        help="sequence lengths (default 256 512 1024 2048 4096; 1024 to 16384 with --check)")
    parser.add_argument("--backends", nargs="+", choices=sorted(CONTENDERS), default=None,
                        help="default: every backend that runs on --device (sdpa triton chunked with --check)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=None,
                        help="fwd+bwd (default), fwd, or both (both with --check)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                        help="default float32; with --check bfloat16 (float16 below compute capability 8.0)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--proj-dim", type=int, default=2, help="d' of the neural score (default 2, the paper's)")
    parser.add_argument("--no-causal", dest="is_causal", action="store_false", help="full instead of causal attention")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the measured one (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, the backends taking turns, and report medians")
    parser.add_argument("--same-process", action="store_true",
                        help="time the backends of one N taking turns in one process (--repeats rounds), not each "
                             "in a fresh process; no memory figures")
    parser.add_argument("--reference-max-n", type=int, default=DEFAULT_MAX_N["reference"],
                        help="skip the reference above this N (default %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="the GPU check: the Triton kernels against the float64 reference on the GPU, then (if "
                             "they pass) the table of sdpa, triton and chunked for N = 1k..16k, forward and "
                             "forward+backward")
    parser.add_argument("--out", default="runs/bench", help="folder for bench.csv, bench.png, bench.md (and "
                                                            "check.txt with --check)")


def main(args):
    start = time.perf_counter()
    out = Path(args.out)
    require_cuda(args.device, args.check)
    if args.threads is not None and args.threads < 1:
        raise argparse.ArgumentError(None, f"--threads must be at least 1, got {args.threads}")
    if args.check:
        print(f"checking the Triton kernels against the float64 reference on "
              f"{torch.cuda.get_device_name(args.device)} ...")
        if not run_self_test(args.device, out):
            raise SystemExit(f"the Triton kernels failed checks on this GPU (see {out / 'check.txt'}); nothing was "
                             "timed")
    capable = args.check and torch.cuda.get_device_capability(args.device) >= (8, 0)
    dtype = args.dtype or ("float32" if not args.check else "bfloat16" if capable else "float16")
    passes = args.passes or (PASSES if args.check else ("fwd+bwd",))
    rows = benchmark(args.ns or (CHECK_NS if args.check else (256, 512, 1024, 2048, 4096)), args.device,
                     getattr(torch, dtype), args.backends or (CHECK_BACKENDS if args.check else None), args.batch,
                     args.heads, args.head_dim, args.proj_dim, args.is_causal, args.repeats, args.threads,
                     {"reference": args.reference_max_n}, passes=passes, rounds=args.rounds,
                     same_process=args.same_process)
    first = rows[0]
    where = torch.cuda.get_device_name(args.device) if first["device"].startswith("cuda") else \
        f"{first['device']}, {first['threads']} CPU thread(s)"
    description = (f"One {' / '.join(passes)} pass per case, B={args.batch}, H={args.heads}, head_dim={args.head_dim}, "
                   f"d'={args.proj_dim}, {'causal' if args.is_causal else 'full'}, {dtype}, {where}; {first['method']}, "
                   f"{first['rounds']} round(s), medians (method: python -c 'import minina.tools.bench; "
                   "help(minina.tools.bench)').")
    write_csv(rows, out / "bench.csv")
    plot(rows, out / "bench.png")
    write_markdown(rows, out / "bench.md", description)
    print(f"\n{description}\n")
    print(timing_table(rows))
    print("\n" + "\n".join(growth_summary(rows)))
    print(f"\nwrote {out / 'bench.csv'}, {out / 'bench.png'} and {out / 'bench.md'} in "
          f"{time.perf_counter() - start:.0f} s")
