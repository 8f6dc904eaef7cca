"""The grader against a determined student: each notebook in its own sandbox (nothing secret in reach, nothing
left running), and a grader that no notebook can crash or stall (malformed metadata, replies it cannot compare,
oversized replies, floods of output, memory), and that grades without a sandbox only when told to (--unsafe).

Each test is one attack class; the notebooks are the handed-out ones with an attack cell added.
"""
import base64
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import pytest
import torch

import minina
from minina.assignments import ASSIGNMENTS
from minina.assignments.probe import SCORE

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "notebooks" / "assignments"
A1 = ASSIGNMENTS["A1"][0] + ".ipynb"
HONEST_PADDING = ("def padding_mask(lengths, max_len):\n"
                  "    return (torch.arange(max_len) < lengths[:, None])[:, None, None, :]\n")


def grade_cli(*args, cwd, env=None, check=True, timeout=600):
    result = subprocess.run([sys.executable, "-m", "minina", "assignments", "grade", *map(str, args)],
                            capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def submit(folder, *sources, base=FOLDER / A1, name=A1):
    """Write base with code cells appended into folder/name."""
    notebook = nbformat.read(base, as_version=4)
    notebook.cells += [nbformat.v4.new_code_cell(source) for source in sources]
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / name)
    return folder / name


def rows_of(out):
    return {row["exercise"]: row for row in csv.DictReader(Path(out).open(encoding="utf-8"))}


def without_source_rule(monkeypatch):
    """Grade in this process with the source rule off, so that a test sees what the sandbox alone stops (the rule
    fails these notebooks' exercises for their exec, subprocess and fork before any check runs)."""
    from minina.assignments import grade as grading

    monkeypatch.setattr(grading, "_violations", lambda sources, spec: [])
    return grading.grade


def test_solutions_and_the_graders_secrets_are_out_of_reach(tmp_path, sandbox, monkeypatch):
    """A notebook that execs the solutions beside an editable install, and looks for the grader's seed and
    environment in its own environment, every /proc it can see and the files it can list, finds nothing."""
    solutions = Path(minina.__file__).resolve().parents[1] / "notebooks" / "assignments" / "solutions"
    steal = (f"import glob, json, os\nfound = []\nsolution = {str(solutions / A1)!r}\n"
             "try:\n"
             "    for cell in json.load(open(solution))['cells']:\n"
             "        if cell['cell_type'] == 'code' and 'def ' in ''.join(cell['source']):\n"
             "            exec(''.join(cell['source']).replace('check(', 'print('), globals())\n"
             "    found.append('the solutions')\n"
             "except Exception as error:\n"
             "    print('no solutions:', error)\n"
             "for path in glob.glob('/proc/[0-9]*/cmdline') + glob.glob('/proc/[0-9]*/environ'):\n"
             "    try:\n"
             "        text = open(path, 'rb').read().decode(errors='replace')\n"
             "    except OSError:\n"
             "        continue\n"
             "    found += [path] if '918273645' in text or 'MININA_GRADER_SECRET' in text else []\n"
             "found += ['environment'] if 'MININA_GRADER_SECRET' in os.environ else []\n"
             f"found += ['submissions'] if os.path.exists({str(tmp_path / 'other')!r}) else []\n"
             "print('found:', found)\n")
    gate = ("_honest = padding_mask\n"
            "def padding_mask(lengths, max_len):\n"
            "    if found:\n"
            "        raise ValueError(f'found {found}')\n"
            "    return _honest(lengths, max_len)\n")
    submit(tmp_path / "other", HONEST_PADDING)
    submit(tmp_path / "thief", steal, HONEST_PADDING, gate)
    monkeypatch.setenv("MININA_GRADER_SECRET", "1")
    without_source_rule(monkeypatch)([tmp_path / "thief", tmp_path / "other"], tmp_path / "grades.csv", seed=918273645)
    rows = list(csv.DictReader((tmp_path / "grades.csv").open(encoding="utf-8")))
    thief = {row["exercise"]: row for row in rows if "/thief/" in row["notebook"]}
    assert thief["A1.padding_mask"]["status"] == "passed", thief["A1.padding_mask"]  # nothing found
    assert thief["A1.masked_softmax"]["status"] == "not attempted"  # the solutions were not there to exec
    assert thief["A1.attention"]["status"] == "not attempted"


def test_no_process_outlives_its_notebook(tmp_path, sandbox, monkeypatch):
    """Processes a notebook detaches (a new session, a double fork) die with its sandbox."""
    token = f"minina-detached-{os.getpid()}-{time.time_ns()}"
    detach = ("import os, subprocess, sys\n"
              f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(900)', {token!r}],\n"
              "                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"
              "    if os.fork() == 0:\n"
              "        null = os.open(os.devnull, os.O_RDWR)\n"
              "        for fd in (0, 1, 2):\n"
              "            os.dup2(null, fd)\n"
              f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(900)', {token!r}])\n"
              "    os._exit(0)\n")
    submit(tmp_path / "detach", detach, HONEST_PADDING)
    without_source_rule(monkeypatch)([tmp_path / "detach"], tmp_path / "grades.csv")
    time.sleep(1)
    survivors = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token in path.read_bytes().decode(errors="replace"):
                survivors.append(int(path.parent.name))
        except OSError:
            continue
    for pid in survivors:  # started by this test: clean up before failing
        os.kill(pid, 9)
    assert not survivors
    assert rows_of(tmp_path / "grades.csv")["A1.padding_mask"]["status"] == "passed"


@pytest.mark.parametrize("pinned", [False, True])
def test_malformed_metadata_keeps_the_batch(tmp_path, pinned, sandbox):
    """{"minina": "A1"} and other wrong types: that notebook's rows say so; every other notebook is graded."""
    for kind, metadata in (("string", "A1"), ("list", ["A1"]), ("number", {"assignment": 1})):
        path = submit(tmp_path / kind, HONEST_PADDING)
        notebook = nbformat.read(path, as_version=4)
        notebook.metadata["minina"] = metadata
        nbformat.write(notebook, path)
    submit(tmp_path / "honest", HONEST_PADDING)
    pin = ["--assignment", "A1"] if pinned else []
    grade_cli(*(tmp_path / kind for kind in ("string", "list", "number", "honest")), *pin, "--out",
              tmp_path / "grades.csv", "--timeout", 60, cwd=tmp_path)
    rows = list(csv.DictReader((tmp_path / "grades.csv").open(encoding="utf-8")))
    for kind, words in (("string", 'metadata "minina" is a str'), ("list", 'metadata "minina" is a list'),
                        ("number", '"minina.assignment" is a int'), ("honest", None)):
        mine = {row["exercise"]: row for row in rows if f"/{kind}/" in row["notebook"]}
        assert mine["A1.padding_mask"]["status"] == "passed", (kind, mine)
        assert all(words in row["message"] for row in mine.values()) if words else True, mine


def test_a_reply_the_checks_cannot_compare_fails_only_its_exercise(tmp_path, sandbox):
    """A meta tensor, or an object whose comparison raises, fails its exercise; the notebook's other rows stay."""
    meta = ("def masked_softmax(logits):\n"
            "    return torch.empty(logits.shape, dtype=logits.dtype, device='meta')\n"
            "def attention(q, k, v, attn_mask=None, is_causal=False):\n"
            "    return torch.empty(q.shape, dtype=q.dtype, device='meta')\n")
    submit(tmp_path / "meta", meta, HONEST_PADDING)
    grade_cli(tmp_path / "meta", "--out", tmp_path / "grades.csv", cwd=tmp_path)
    rows = rows_of(tmp_path / "grades.csv")
    assert rows["A1.padding_mask"]["status"] == "passed", rows
    for exercise in ("A1.masked_softmax", "A1.attention"):
        assert rows[exercise]["status"] in ("failed", "error") and rows[exercise]["points"] == "0", rows[exercise]


def test_replies_are_bounded_before_anything_is_built():
    """A reply naming a NeuralScore far larger than the grader rebuilds, or one whose weights do not fit its
    options, becomes an opaque stand-in without allocating it; an oversized or compressed reply is refused."""
    from minina.assignments.checks import GraderError, Opaque
    from minina.assignments.grade import REPLY_LIMIT, decode
    from minina.assignments.probe import encode, portable
    from minina.scores import NeuralScore

    huge = {SCORE: dict(head_dim=8, proj_dim=8, hidden=(1 << 16, 1 << 16), activation="relu", residual=False),
            "state": {"q_proj.weight": torch.zeros(8, 8)}}  # 2**32 weights if rebuilt
    start = time.perf_counter()
    assert isinstance(decode(encode({"output": huge}), "a test")["output"], Opaque)
    assert time.perf_counter() - start < 5
    honest = decode(encode({"output": portable(NeuralScore(8, proj_dim=4))}), "a test")["output"]
    assert isinstance(honest, NeuralScore) and honest.proj_dim == 4
    with pytest.raises(GraderError, match="longer than"):
        decode("A" * (REPLY_LIMIT + 4), "a test")
    buffer = io.BytesIO()
    with __import__("zipfile").ZipFile(buffer, "w", __import__("zipfile").ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * 10_000_000)
    with pytest.raises(GraderError, match="compressed"):
        decode(base64.b64encode(buffer.getvalue()).decode(), "a test")


def test_a_flood_of_output_is_cut_and_noted(tmp_path, sandbox):
    """A cell printing 100 MB keeps the first OUTPUT_LIMIT characters, the rows say so, the grade stands."""
    flood = "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))\n"
    submit(tmp_path / "flood", flood, HONEST_PADDING)
    grade_cli(tmp_path / "flood", "--out", tmp_path / "grades.csv", cwd=tmp_path)
    rows = rows_of(tmp_path / "grades.csv")
    assert rows["A1.padding_mask"]["status"] == "passed", rows
    cell = len(nbformat.read(FOLDER / A1, as_version=4).cells)
    assert all(f"the output of cell {cell} was cut at" in row["message"] for row in rows.values()), rows


def test_memory_is_bounded_per_notebook(tmp_path, sandbox):
    """A notebook cannot map more than --memory GiB: the allocation fails in the kernel, the grader goes on."""
    hog = ("try:\n"
           "    hog = torch.empty(6 << 30, dtype=torch.uint8)\n"
           "    bounded = False\n"
           "except (MemoryError, RuntimeError) as error:\n"
           "    bounded = True\n"
           "_honest = padding_mask\n"
           "def padding_mask(lengths, max_len):\n"
           "    if not bounded:\n"
           "        raise ValueError('6 GiB mapped')\n"
           "    return _honest(lengths, max_len)\n")
    submit(tmp_path / "hog", HONEST_PADDING, hog)
    grade_cli(tmp_path / "hog", "--out", tmp_path / "grades.csv", "--memory", 4, cwd=tmp_path)
    assert rows_of(tmp_path / "grades.csv")["A1.padding_mask"]["status"] == "passed"


def test_without_a_sandbox_grading_refuses_unless_unsafe(tmp_path):
    """No bwrap on PATH: one line saying what to install, exit 1; with --unsafe it grades and warns."""
    submit(tmp_path / "honest", HONEST_PADDING)
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))
    result = grade_cli(tmp_path / "honest", "--out", tmp_path / "grades.csv", cwd=tmp_path, env=env, check=False)
    assert result.returncode == 1 and not (tmp_path / "grades.csv").exists()
    assert result.stderr.strip().count("\n") == 0 and "bubblewrap" in result.stderr and "--unsafe" in result.stderr
    result = grade_cli(tmp_path / "honest", "--out", tmp_path / "grades.csv", "--unsafe", cwd=tmp_path, env=env)
    assert "warning: --unsafe, no sandbox" in result.stderr
    assert rows_of(tmp_path / "grades.csv")["A1.padding_mask"]["status"] == "passed"


def test_the_readme_grading_command_gives_the_solutions_full_marks(tmp_path, sandbox):
    """README: `python -m minina assignments grade notebooks/assignments/solutions --out x.csv`, as whoever runs
    the tests (root in CI, with Python under /root where pyenv puts it)."""
    result = subprocess.run([sys.executable, "-m", "minina", "assignments", "grade", "notebooks/assignments/solutions",
                             "--out", tmp_path / "x.csv"], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "x.csv").open(encoding="utf-8")))
    assert len({row["assignment"] for row in rows}) == 7
    assert all(row["status"] == "passed" for row in rows), [row for row in rows if row["status"] != "passed"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not all(
    map(shutil.which, ("unshare", "setpriv", "mount"))), reason="switches to the user nobody: needs root")
def test_grading_as_a_normal_user(tmp_path, sandbox):
    """The grader run by an unprivileged user (nobody) sandboxes its notebooks too and gives a solution full marks.

    This Python may live under /root (pyenv, a CI venv), closed to other users: in a private mount namespace /root
    becomes an open, empty folder with only the Python's folders bound back in, as on a machine where Python is
    installed for every user.
    """
    needed = [Path(sys.executable).resolve().parents[1], Path(sys.prefix), ROOT,
              *(Path(path) for path in sys.path if path and Path(path).is_dir())]
    under_root = sorted({Path("/root", *path.resolve().relative_to("/root").parts[:1]) for path in needed
                         if path.resolve().is_relative_to("/root")})
    out = Path(tempfile.mkdtemp())  # where nobody may write
    out.chmod(0o777)
    script = ["set -e"]
    for index, path in enumerate(under_root):
        script += [f"keep{index}=$(mktemp -d)", f"mount --bind {path} $keep{index}"]
    script += ["mount -t tmpfs -o mode=755 tmpfs /root"] if under_root else []
    for index, path in enumerate(under_root):
        script += [f"mkdir -p {path}", f"mount --bind $keep{index} {path}", f"umount $keep{index}",
                   f"rmdir $keep{index}"]
    script.append(f'exec setpriv --reuid=65534 --regid=65534 --clear-groups env HOME={out} "$@"')
    try:
        result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(script), "sh",
                                 sys.executable, "-m", "minina", "assignments", "grade",
                                 f"notebooks/assignments/solutions/{A1}", "--out", out / "x.csv"],
                                capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = list(csv.DictReader((out / "x.csv").open(encoding="utf-8")))
        assert (out / "x.csv").stat().st_uid == 65534  # written by the grader running as nobody
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert len(rows) == 3 and all(row["status"] == "passed" for row in rows), rows


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_folders_under_tmp_stay_visible():
    # the sandbox's own empty /tmp must not hide what it shows from /tmp (a venv or a checkout cloned there, as CI's)
    from minina.assignments.sandbox import sandbox_command

    with tempfile.TemporaryDirectory(dir="/tmp") as shown, tempfile.TemporaryDirectory(dir="/tmp") as private, \
            tempfile.TemporaryDirectory(dir="/tmp") as unshown:
        (Path(shown) / "python.txt").write_text("interpreter here")
        result = subprocess.run(sandbox_command(private, [shown]) + ["/bin/cat", f"{shown}/python.txt"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == "interpreter here", result.stderr
        listing = subprocess.run(sandbox_command(private, [shown]) + ["/bin/ls", "/tmp"], capture_output=True,
                                 text=True, timeout=60).stdout.split()
        assert Path(shown).name in listing and Path(private).name in listing and Path(unshown).name not in listing


def test_data_behind_a_link_reaches_the_kernel(tmp_path, monkeypatch):
    # the sandbox shows folders by their real path, so the kernel's MININA_DATA must name that path, not the link
    from minina.assignments.sandbox import kernel_environment

    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.setenv("MININA_DATA", str(tmp_path / "link"))
    assert kernel_environment(tmp_path / "kernel")["MININA_DATA"] == str((tmp_path / "data").resolve())
