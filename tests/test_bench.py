"""The benchmark: its memory method sees torch's CPU allocations, its rows and ratios, its CLI and its errors."""
import argparse
import csv
import json
import re
import subprocess
import sys

import pytest
import torch

from minina.tools import bench


def test_peak_memory_sees_the_reference_pair_tensor():
    case = dict(n=512, heads=2, head_dim=64, proj_dim=2, is_causal=False, repeats=0, threads=1)
    reference = bench.measure_in_fresh_process(backend="reference", **case)
    chunked = bench.measure_in_fresh_process(backend="chunked", **case)
    pair_tensor_mib = 2 * 512 * 512 * (2 * 2) * 4 / 2 ** 20  # (B, H, N, N, 2P) float32, built in the forward
    assert reference["peak_mib"] >= pair_tensor_mib
    assert chunked["peak_mib"] < reference["peak_mib"] / 2
    assert reference["time_s"] > 0 and chunked["time_s"] > 0


def test_peak_memory_without_proc_is_sampled_through_psutil():
    """Without Linux's /proc (macOS, Windows) the resident set is sampled through psutil: it still sees the pair
    tensor, in a fresh process as the benchmark runs every case."""
    case = dict(backend="reference", n=512, heads=2, head_dim=64, proj_dim=2, is_causal=False, repeats=0, threads=1)
    code = ("import json, sys; from pathlib import Path; from minina.tools import bench\n"
            "bench.PROC_SELF = Path('/nonexistent')  # as on macOS and Windows\n"
            "print(json.dumps(bench.measure(**json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["peak_mib"] >= 2 * 512 * 512 * (2 * 2) * 4 / 2 ** 20  # (B, H, N, N, 2P) float32


def test_forward_pass_keeps_no_activations():
    """A "fwd" pass runs under no_grad: the reference still builds its pair tensor but keeps far less than for a
    backward."""
    case = dict(n=512, heads=2, head_dim=64, proj_dim=2, is_causal=False, repeats=0, threads=1)
    forward = bench.measure_in_fresh_process(backend="reference", pass_="fwd", **case)
    both = bench.measure_in_fresh_process(backend="reference", pass_="fwd+bwd", **case)
    assert forward["peak_mib"] >= 2 * 512 * 512 * (2 * 2) * 4 / 2 ** 20  # the (B, H, N, N, 2P) float32 pairs
    assert both["peak_mib"] > 1.5 * forward["peak_mib"]


def test_cli_writes_table_csv_and_plot(tmp_path):
    result = subprocess.run([sys.executable, "-m", "minina", "bench", "--ns", "32", "64", "--heads", "2",
                             "--repeats", "1", "--threads", "1", "--reference-max-n", "32", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "bench.csv") as file:
        rows = list(csv.DictReader(file))
    assert [(row["backend"], row["n"]) for row in rows] == [
        ("sdpa", "32"), ("reference", "32"), ("chunked", "32"), ("compiled", "32"), ("sdpa", "64"), ("chunked", "64"),
        ("compiled", "64")]
    sdpa = {row["n"]: row for row in rows if row["backend"] == "sdpa"}
    for row in rows:
        expected = float(row["time_s"]) / float(sdpa[row["n"]]["time_s"])
        assert float(row["time_vs_sdpa"]) == pytest.approx(expected)
        assert f"| {row['backend']} | {row['n']} | {1000 * float(row['time_s']):.1f} |" in result.stdout
    assert "chunked: peak memory x" in result.stdout and "at N=32: chunked uses" in result.stdout
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "bench.md").read_text()
    assert "| backend | N | time (ms) |" in markdown and "| pass |" not in markdown  # one pass: no pass column
    for row in rows:
        assert f"| {row['backend']} | {row['n']} | {1000 * float(row['time_s']):.1f} |" in markdown
        assert row["pass"] == "fwd+bwd"


def test_summary_and_ratios_from_rows():
    rows = [{"backend": b, "n": n, "time_s": t, "peak_mib": m} for b, n, t, m in [
        ("reference", 8, 2.0, 40.0), ("chunked", 8, 1.0, 4.0), ("chunked", 16, 3.0, 9.0)]]
    assert bench.growth_summary(rows) == [
        "at N=8: chunked uses 10.0x less memory than the reference and takes 0.50x its time",
        "chunked: peak memory x2.25, time x3.00 from N=8 to N=16"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(ns=[]), "ns must be a non-empty list"), (dict(ns=[0]), "ns must be"),
    (dict(ns=[8], backends=["flash"]), r"backends must be names from .*\['flash'\]"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.benchmark(**kwargs)


def test_failed_case_reports_its_error():
    with pytest.raises(RuntimeError, match="(?s)benchmark case.*failed.*float3"):
        bench.measure_in_fresh_process(backend="sdpa", n=8, dtype="float3")


def test_table_and_summary_with_both_passes():
    rows = [{"backend": b, "pass": p, "n": n, "time_s": t, "peak_mib": m, "time_vs_sdpa": None,
             "memory_vs_sdpa": None} for b, p, n, t, m in [
        ("chunked", "fwd", 8, 0.5, 2.0), ("chunked", "fwd", 16, 1.0, 3.0),
        ("chunked", "fwd+bwd", 8, 1.0, 4.0), ("chunked", "fwd+bwd", 16, 3.0, 9.0)]]
    table = bench.timing_table(rows).splitlines()
    assert table[0].startswith("| backend | pass | N |") and table[2] == "| chunked | fwd | 8 | 500.0 | 2.0 |  |  |"
    assert bench.growth_summary(rows) == ["chunked: peak memory x2.25, time x3.00 from N=8 to N=16"]  # fwd+bwd rows


def test_bad_passes():
    with pytest.raises(ValueError, match=r"passes must be a non-empty list from \('fwd', 'fwd\+bwd'\)"):
        bench.benchmark(ns=[8], passes=["backward"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --check would run")
@pytest.mark.parametrize("device, message", [
    ("cpu", "--check runs the Triton kernels on a CUDA GPU, but got --device cpu; run it on a GPU machine with "
            "--device cuda"),
    ("cuda", "--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here"),
])
def test_check_without_a_gpu_fails_clearly(device, message, tmp_path):
    """--check needs CUDA: on a machine without one it stops with one line and exit code 2, before timing anything."""
    with pytest.raises(argparse.ArgumentError, match=re.escape(message)):
        bench.require_cuda(device, check=True)
    result = subprocess.run([sys.executable, "-m", "minina", "bench", "--check", "--device", device, "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "bench.csv").exists()


def test_check_runs_the_self_test_shipped_in_the_package(monkeypatch, tmp_path, capsys):
    """--check's kernel checks come from minina.tools.triton_check, not from a tests/ folder a wheel does not have:
    a log line per check in check.txt, and False when one fails."""
    from minina.tools import triton_check

    def broken():
        raise AssertionError("dq: Tensor-likes are not close!")

    monkeypatch.setattr(triton_check, "gpu_checks", lambda device: [("sound", lambda: None), ("broken", broken)])
    assert not bench.run_self_test("cpu", tmp_path)
    log = (tmp_path / "check.txt").read_text()
    assert log.startswith("passed sound\nFAILED broken: AssertionError: dq: Tensor-likes are not close!\n")
    assert log.endswith("1 passed, 1 failed\n") and "--- broken ---" in log
    assert "  1 passed, 1 failed" in capsys.readouterr().out
    monkeypatch.setattr(triton_check, "gpu_checks", lambda device: [("sound", lambda: None)])
    assert bench.run_self_test("cpu", tmp_path)


def test_backends_take_turns_in_one_process(monkeypatch):
    """measure_alternating warms every backend up, then runs them in turn, round after round."""
    calls = []
    for name in ("sdpa", "chunked"):
        attention = bench.CONTENDERS[name][0]
        monkeypatch.setitem(bench.CONTENDERS, name, (lambda *args, name=name, f=attention: calls.append(name) or
                                                     f(*args), ("cpu",)))
    figures = bench.measure_alternating(["sdpa", "chunked"], 32, heads=2, repeats=3, threads=1)
    assert calls == ["sdpa", "chunked"] + ["sdpa", "chunked"] * 3  # the warm-ups, then three rounds
    for name in ("sdpa", "chunked"):
        assert len(figures[name]["rounds"]) == 3
        assert figures[name]["time_s"] == pytest.approx(sorted(figures[name]["rounds"])[1])


def test_rounds_and_one_process_rows(tmp_path):
    fresh = bench.benchmark(ns=[32], backends=["sdpa", "chunked"], heads=2, repeats=1, threads=1, rounds=2,
                            progress=None)
    assert [(row["backend"], row["rounds"], row["method"]) for row in fresh] == [
        ("sdpa", 2, "a fresh process per case"), ("chunked", 2, "a fresh process per case")]
    assert fresh[0]["time_vs_sdpa"] == 1.0 and fresh[1]["peak_mib"] is not None
    same = bench.benchmark(ns=[32], backends=["sdpa", "chunked"], heads=2, repeats=3, threads=1, same_process=True,
                           progress=None)
    assert [(row["backend"], row["rounds"]) for row in same] == [("sdpa", 3), ("chunked", 3)]
    assert all(row["peak_mib"] is None and row["memory_vs_sdpa"] is None for row in same)
    assert same[0]["time_vs_sdpa"] == 1.0 and same[1]["time_vs_sdpa"] > 0
    assert "| chunked | 32 |" in bench.timing_table(same)
    bench.plot(same, tmp_path / "same.png")  # the time axis alone: no memory was measured
    assert (tmp_path / "same.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="rounds must be a positive int"):
        bench.benchmark(ns=[32], rounds=0)
