"""Grade submitted notebooks: run each in a fresh, sandboxed kernel, decide every verdict here, outside it.

The kernel runs the notebook's cells, then only answers requests (minina.assignments.probe): this process draws
every input from the seed, computes the expected values with minina's own code, sends the inputs (and a seed per
call derived from the base seed, never the base seed itself), and compares what comes back (checks.run_exercise
with RemoteHandles). A row's points are its exercise's points when that comparison passes, else 0: nothing the
notebook prints, patches or defines sets them.

Each kernel runs in its own sandbox (minina.assignments.sandbox): a private folder holding the notebook's copy, a
read-only Python and minina, no network, no view of the grader or of other notebooks, its address space bounded
by `memory`. Where no sandbox starts, grading refuses unless unsafe=True. A cell, or an exercise's checks, get
`timeout` seconds (then an interrupt, and the kernel is killed if it ignores it); the whole notebook gets
`notebook_timeout`, after which its sandbox is killed with everything in it. What a kernel sends back is bounded
before it is decoded (OUTPUT_LIMIT per cell, REPLY_LIMIT per reply, SCORE_LIMIT per rebuilt score). The output is
written by this process only, at the end, atomically.
"""
import base64
import functools
import hashlib
import io
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import nbformat
import torch
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from .checks import EXERCISES, GraderError, Handle, Result, restore, run_exercise
from .probe import OPAQUE, REPLY_MARKER, SCORE, encode
from .rules import source_violations
from .sandbox import interpreter_paths, kernel_environment, memory_limit, sandbox_available, sandbox_command
from .submission import csv_text, gradescope_text, plan, rows_for, summary_table, write_atomic

PING_TIMEOUT = 5  # seconds an interrupted kernel has to become idle before it is killed
TIMED_OUT = "minina: the cell ran out of time"  # the evalue nbclient reports for a timed-out cell
OUTPUT_LIMIT = 1 << 20  # characters of output kept per notebook cell; the rest is dropped, and the rows say so
REPLY_LIMIT = 32 << 20  # characters of a probe's reply (base64), and of its request cell's whole output
SCORE_LIMIT = 1 << 24  # parameters of a NeuralScore the grader rebuilds from a reply
MEMORY = 8 << 30  # bytes of address space per process of a notebook's kernel (--memory)
UNSAFE = ("warning: --unsafe, no sandbox: each notebook can read what the grader's user can read (other "
          "submissions, the solutions, private checks), see and signal the grader's processes, use the network and "
          "leave processes behind; its memory is bounded only where prlimit exists")


class _KernelManager(AsyncKernelManager):
    """A kernel manager that starts the kernel behind `prefix` (the sandbox) and interrupts it by message.

    The process it starts is the sandbox, not the kernel, so a signal would not reach the kernel: ipykernel answers
    an interrupt_request on its control channel by interrupting itself.
    """

    prefix = ()

    @property
    def kernel_spec(self):
        spec = AsyncKernelManager.kernel_spec.fget(self)
        if spec is not None:
            spec.interrupt_mode = "message"
        return spec

    def format_kernel_cmd(self, extra_arguments=None):
        return [*self.prefix, *super().format_kernel_cmd(extra_arguments)]


class _Client(NotebookClient):
    """nbclient keeping at most `limit(cell_index)` characters of output per cell; `cut` names the cells cut."""

    def __init__(self, *args, limit, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit, self.used, self.cut = limit, {}, set()

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        size = len(content.get("text", "")) + sum(len(str(value)) for value in content.get("data", {}).values())
        self.used[cell_index] = self.used.get(cell_index, 0) + size
        if self.used[cell_index] > self.limit(cell_index):
            self.cut.add(cell_index)
            if msg.get("msg_type") != "error":
                return None
            content = dict(content, evalue=str(content.get("evalue"))[:1000], traceback=[])  # the error stays
            msg = dict(msg, content=content)
        return super().output(outs, msg, display_id, cell_index)


class Kernel:
    """A kernel running one notebook in folder, behind prefix (the sandbox); cells and requests by timeout."""

    def __init__(self, notebook, folder, prefix, timeout, notebook_timeout):
        self.notebook, self.folder, self.timeout = notebook, Path(folder), timeout
        self.running, self.killed, self.nonce = "starting the kernel", None, secrets.token_hex(8)
        km = _KernelManager(kernel_name="python3", transport="ipc" if os.name == "posix" else "tcp",
                            ip=str(self.folder / "kernel") if os.name == "posix" else "127.0.0.1")
        km.prefix, km.connection_file = list(prefix), str(self.folder / "kernel.json")
        self.popen = dict(cwd=str(self.folder), env=kernel_environment(self.folder))
        self.cells = len(notebook.cells)  # the notebook's own cells; the grader's requests come after
        self.client = _Client(notebook, km=km, timeout=timeout, kernel_name="python3", allow_errors=True,
                              interrupt_on_timeout=True, record_timing=False, coalesce_streams=True,
                              error_on_timeout={"ename": "TimeoutError", "evalue": TIMED_OUT, "traceback": []},
                              on_cell_executed=self._note_reply,
                              limit=lambda index: OUTPUT_LIMIT if index < self.cells else REPLY_LIMIT + 4096)
        self.reply = None
        self.watchdog = threading.Timer(notebook_timeout, self.kill, args=(f"ran longer than {notebook_timeout:g} "
                                                                           f"s (the notebook's time limit)",))
        self.watchdog.daemon = True

    def kill(self, why):
        """Kill the kernel's sandbox (its first process's group), and with it every process in the sandbox."""
        self.killed = self.killed or f"{why}, stopped while {self.running}"
        process = getattr(self.client.km.provisioner, "process", None) if self.client.km else None
        if process is not None:
            try:
                os.killpg(process.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass

    def _note_reply(self, cell, cell_index, execute_reply):
        self.reply = execute_reply

    def _execute(self, cell, index, timeout):
        """Execute cell within timeout s (then interrupt it); whether it timed out."""
        self.client.timeout, self.reply = max(1, int(timeout + 0.999)), None
        self.client.execute_cell(cell, index)
        return (self.reply or {}).get("content", {}).get("evalue") == TIMED_OUT

    def run(self, cell, index, timeout, what):
        """Execute cell (notebook index `index`) within timeout s; True if it finished in time."""
        self.running = what
        try:
            timed_out = self._execute(cell, index, timeout)
        except Exception as error:  # the kernel died (killed, or crashed)
            raise GraderError(self.killed or f"the kernel died while {what}: {type(error).__name__}") from None
        if timed_out:
            cell.outputs.append(nbformat.v4.new_output("error", ename="TimeoutError", traceback=[],
                                                       evalue=f"ran longer than {timeout:g} s"))
            self._ensure_idle(what, timeout)
        return not timed_out

    def _ensure_idle(self, what, timeout):
        """After a time-out's interrupt: a kernel that does not answer a trivial cell is killed."""
        ping = nbformat.v4.new_code_cell("pass")
        self.notebook.cells.append(ping)
        try:
            stuck = self._execute(ping, len(self.notebook.cells) - 1, PING_TIMEOUT)
        except Exception:
            stuck = True
        if stuck:
            self.kill(f"ran longer than {timeout:g} s and ignored the interrupt")
            raise GraderError(self.killed.replace("stopped while", "the kernel was stopped while"))

    def request(self, payload, timeout, what):
        """The reply of the kernel's probe to payload; a timed-out call becomes a TimeoutError reply."""
        cell = nbformat.v4.new_code_cell(f"__minina_probe_{self.nonce}.serve({encode(payload)!r})")
        self.notebook.cells.append(cell)  # nbclient records outputs in the notebook, so the cell lives there
        if not self.run(cell, len(self.notebook.cells) - 1, timeout, what):
            return {"output": None, "forbidden": [], "observed": {},
                    "error": {"type": "TimeoutError", "message": f"ran longer than {timeout:g} s", "stub": False}}
        marker = f"{REPLY_MARKER}-{self.nonce} "
        lines = [line for out in cell.outputs if out.get("output_type") == "stream"
                 for line in out.get("text", "").splitlines() if line.startswith(marker)]
        errors = [f"{out.get('ename')}: {str(out.get('evalue'))[:200]}" for out in cell.outputs
                  if out.get("output_type") == "error"]
        if len(lines) != 1:
            raise GraderError(f"the check could not run ({errors[0]})" if errors and not lines else
                              f"the grader's request while {what} got {len(lines)} replies; notebook code printed "
                              f"into the reply")
        return decode(lines[0][len(marker):], what)

    def __enter__(self):
        self._context = self.client.setup_kernel(**self.popen)
        self.watchdog.start()
        try:
            self._context.__enter__()
        except BaseException:
            self.watchdog.cancel()
            raise
        setup = nbformat.v4.new_code_cell(
            "from minina.assignments.probe import Probe as __minina_Probe\n"
            f"__minina_probe_{self.nonce} = __minina_Probe(get_ipython().user_ns, {self.nonce!r})\n"
            "del __minina_Probe")
        self.notebook.cells.append(setup)
        self.run(setup, len(self.notebook.cells) - 1, self.timeout, "starting the grader's probe")
        if any(out.get("output_type") == "error" for out in setup.outputs):
            raise GraderError(f"the grader's probe did not start in the kernel: {setup.outputs[-1].get('evalue')}")
        return self

    def __exit__(self, *exc):
        self.watchdog.cancel()
        try:
            self._context.__exit__(None, None, None)
        except Exception:  # a killed kernel may fail to shut down cleanly; it is killed below either way
            pass
        self.kill("graded")


def decode(text, what):
    """A probe's reply (base64 of torch.save) as Python objects, its sizes checked before anything is built."""
    try:
        if len(text) > REPLY_LIMIT:
            raise ValueError(f"longer than {REPLY_LIMIT} characters")
        data = base64.b64decode(text, validate=True)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:  # torch.save's format: its records are stored as is
            if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > len(data) for i in archive.infolist()):
                raise ValueError("a compressed or oversized record")
        return restore(_plain(torch.load(io.BytesIO(data), weights_only=True)))
    except Exception as error:
        raise GraderError(f"the reply while {what} could not be read ({type(error).__name__}: "
                          f"{str(error)[:100]})") from None


def _plain(value, depth=0):
    """value with each tensor not on the CPU in strided layout, and each NeuralScore description that would build
    more than SCORE_LIMIT parameters or other weights than it sends, replaced by an opaque stand-in."""
    if isinstance(value, torch.Tensor):
        plain = value.device.type == "cpu" and value.layout == torch.strided and not value.is_quantized
        return value if plain else {OPAQUE: f"Tensor on {value.device.type} ({value.layout})"}
    if isinstance(value, dict) and SCORE in value:
        return value if _score_fits(value) else {OPAQUE: "NeuralScore larger than the grader rebuilds"}
    if depth > 8:
        return {OPAQUE: "nested too deeply"}
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(x, depth + 1) for x in value)
    if isinstance(value, dict):
        return {key: _plain(x, depth + 1) for key, x in value.items()}
    return value


def _score_fits(description):
    """Whether a NeuralScore description builds at most SCORE_LIMIT parameters, exactly those its weights fill."""
    from ..scores import NeuralScore

    options, state = description.get(SCORE), description.get("state")
    if not isinstance(options, dict) or not isinstance(state, dict) or not state:
        return False
    sizes = [options.get("head_dim"), options.get("proj_dim")]
    hidden = options.get("hidden")
    sizes += list(hidden) if isinstance(hidden, (tuple, list)) and len(hidden) <= 16 else [] if (
        hidden is None or isinstance(hidden, str)) else [None]
    if any(size is not None and not (isinstance(size, int) and 0 < size <= SCORE_LIMIT) for size in sizes):
        return False
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in state.values()):
        return False
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            built = NeuralScore(**options).state_dict()
    except Exception:
        return False
    return (sum(t.numel() for t in built.values()) <= SCORE_LIMIT
            and {k: tuple(t.shape) for k, t in built.items()} == {k: tuple(t.shape) for k, t in state.items()})


def call_seed(seed, exercise_id, number):
    """The seed of call `number` of an exercise's checks: derived from the base seed, which never leaves here."""
    digest = hashlib.sha256(f"{seed}/{exercise_id}/{number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RemoteHandle(Handle):
    """A notebook object in the kernel: calls go to the probe, within the exercise's time limit."""

    def __init__(self, kernel, name, exercise_id, forbid, seed, deadline):
        super().__init__(None, exercise_id, forbid)
        self.kernel, self.name, self.seed, self.deadline, self.calls = kernel, name, seed, deadline, 0

    def reply(self, args, kwargs, observe=None):
        self.calls += 1
        payload = dict(kind="call", name=self.name, args=list(args), kwargs=kwargs, forbid=list(self.forbid),
                       observe=observe, seed=call_seed(self.seed, f"{self.exercise_id}/{self.name}", self.calls))
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return {"output": None, "forbidden": [], "observed": {},
                    "error": {"type": "TimeoutError", "message": f"the checks ran longer than "
                                                                 f"{self.kernel.timeout:g} s", "stub": False}}
        return self.kernel.request(payload, remaining, f"checking {self.exercise_id}")

    def value(self):
        return self.kernel.request(dict(kind="value", name=self.name), self.kernel.timeout,
                                   f"checking {self.exercise_id}")


def grade_exercise(kernel, spec, seed, cell_errors, violations=()):
    """The Result of one exercise, its checks run here on the kernel's objects. Violations of the source rule
    (rules.source_violations) fail an attempted exercise before any check runs; an error of the checks themselves
    (a reply they cannot compare) is this exercise's error row, unless the kernel is gone."""
    try:
        states = kernel.request(dict(kind="names", names=list(spec.names)), kernel.timeout, f"checking {spec.id}")
        missing = [name for name, state in states.items() if state == "missing"]
        if missing:
            message = f"{', '.join(missing)} not defined after running the notebook"
            message += f" ({'; '.join(cell_errors[:3])})" if cell_errors else ""
            return Result(spec.id, "error", message, max_points=spec.points)
        if "stub" in states.values():
            return Result(spec.id, "not attempted", max_points=spec.points)
        if violations:
            return Result(spec.id, "failed", "; ".join(violations[:3]), max_points=spec.points)
        deadline = time.monotonic() + kernel.timeout
        handles = [RemoteHandle(kernel, name, spec.id, spec.forbid, seed, deadline) for name in spec.names]
        return run_exercise(spec.id, None, seed, handles=handles)
    except Exception as error:
        if kernel.killed or isinstance(error, GraderError) and "kernel died" in str(error):
            raise GraderError(kernel.killed or str(error)) from None
        return Result(spec.id, "error", f"the checks could not compare the reply: {type(error).__name__}: "
                                        f"{str(error)[:200]}", max_points=spec.points)


def cell_errors(notebook, count):
    """'cell N: Name: value' for each of the first count code cells whose outputs hold an error."""
    errors = []
    for index, cell in enumerate(notebook.cells[:count]):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output.get('ename')}: {str(output.get('evalue'))[:120]}")
    return errors


def _violations(sources, spec):
    """rules.source_violations, where code the rule cannot read (nested past Python's recursion limit, say) fails."""
    try:
        return source_violations(sources, spec)
    except Exception as error:
        return [f"{spec.id}: the grader's source rule could not read the notebook's code ({type(error).__name__})"]


def run_notebook(notebook, assignment, folder, seed, timeout, notebook_timeout, prefix):
    """(The Results of assignment's exercises on notebook, run in a kernel in folder behind prefix, a note on
    output that was cut)."""
    results, specs = [], [e for e in EXERCISES.values() if e.assignment == assignment]
    count, kernel = len(notebook.cells), None
    try:
        with Kernel(notebook, folder, prefix, timeout, notebook_timeout) as kernel:
            for index, cell in enumerate(notebook.cells[:count]):
                if cell.cell_type == "code":
                    first = str(cell.source).strip().split("\n")[0][:60]
                    kernel.run(cell, index, timeout, f"running cell {index} ({first})")
            errors = cell_errors(notebook, count)
            sources = [(i, str(cell.source)) for i, cell in enumerate(notebook.cells[:count])
                       if cell.cell_type == "code"]
            for spec in specs:
                results.append(grade_exercise(kernel, spec, seed, errors, _violations(sources, spec)))
    except GraderError as error:  # the kernel was killed or died: what is left could not be checked
        done = {result.exercise for result in results}
        results += [Result(spec.id, "error", f"the notebook could not be graded to the end: {error}",
                           max_points=spec.points) for spec in specs if spec.id not in done]
    except Exception as error:  # the kernel would not start, or the notebook is malformed
        results = [Result(spec.id, "error", f"the kernel could not run: {type(error).__name__}: {error}",
                          max_points=spec.points) for spec in specs]
    cut = sorted(index for index in (kernel.client.cut if kernel else ()) if index < count)
    note = (f"the output of cell{'s' if len(cut) > 1 else ''} {', '.join(map(str, cut))} was cut at "
            f"{OUTPUT_LIMIT} characters" if cut else "")
    return results, note


def grade_notebook(path, assignment, seed=0, timeout=300, notebook_timeout=None, prefix=(), note=""):
    """The grade rows of one notebook graded as assignment (dicts with COLUMNS); never raises for a bad one.

    prefix: a function of the kernel's folder giving the argv prefix that isolates it (see grade()), or a list.
    """
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:
        return rows_for(path, assignment, "error", f"not a readable notebook: {type(error).__name__}: {error}")
    folder = Path(tempfile.mkdtemp(prefix="minina-grade-"))
    try:
        os.chmod(folder, 0o700)
        shutil.copyfile(path, folder / Path(path).name)
        results, cut = run_notebook(notebook, assignment, folder, seed, timeout, notebook_timeout or 4 * timeout,
                                    prefix(folder) if callable(prefix) else prefix)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [dict(notebook=str(path), assignment=assignment, exercise=r.exercise, status=r.status,
                 points=r.points if r.status == "passed" else 0, max_points=r.max_points,
                 message="; ".join(m for m in (note, r.message, cut) if m)) for r in results]


def load_extra_checks(path):
    """Run an instructor's file of @exercise checks, so they are graded like the public ones."""
    import runpy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--extra-checks: no file {path}")
    before = set(EXERCISES)
    runpy.run_path(str(path), run_name="minina_extra_checks")
    return sorted(set(EXERCISES) - before)


def isolation(unsafe=False, memory=MEMORY, hidden=()):
    """The function of a kernel's folder giving the argv prefix its kernel starts behind: the sandbox where one
    starts here; else, with unsafe=True, only the memory bound (a warning names what is not protected); else a
    ValueError saying what to install or enable."""
    paths = interpreter_paths()
    available, reason = sandbox_available(paths)
    if available:
        return functools.partial(sandbox_command, paths=paths, hidden=hidden, memory=memory)
    if not unsafe:
        raise ValueError(f"no sandbox for the notebooks: {reason}; or pass --unsafe to grade without one")
    print(UNSAFE, file=sys.stderr)
    return lambda folder: memory_limit(memory, required=False)


def grade(paths, out, seed=0, timeout=300, format="csv", assignment=None, notebook_timeout=None,
          visibility="visible", extra_checks=None, unsafe=False, memory=MEMORY):
    """Grade the submission(s) in paths, write out (CSV or Gradescope JSON) at the end, print the summary.

    Returns the rows. Each folder in paths is one submission (see minina.assignments.submission); each notebook
    runs in its own sandbox (unsafe=True grades without one where none starts), memory bytes of address space
    per process.
    """
    start = time.perf_counter()
    if extra_checks:
        load_extra_checks(extra_checks)
    prefix = isolation(unsafe, memory, hidden=[extra_checks] if extra_checks else [])
    graded, ignored, unknown = plan(paths, assignment)
    rows = []
    for path, name, note in graded:
        try:
            rows += grade_notebook(path, name, seed, timeout, notebook_timeout, prefix, note)
        except Exception as error:  # a last line: one notebook never stops the batch
            rows += rows_for(path, name, "error", f"the grader failed on it: {type(error).__name__}: {error}")
    for path, message in unknown:
        rows += rows_for(path, None, "error", message)
    rows += [dict(notebook=str(path), assignment="", exercise="", status="ignored", points=0, max_points=0,
                  message=reason) for path, reason in ignored]
    mine = {str(path): [row for row in rows if row["notebook"] == str(path)] for path, _, _ in graded}
    output = "\n".join(f"{Path(path).name} graded as {name}: {sum(r['points'] for r in mine[str(path)]):g}/"
                       f"{sum(r['max_points'] for r in mine[str(path)]):g} points" for path, name, _ in graded)
    if not graded and not unknown:
        output = f"no notebook (.ipynb) found in {', '.join(map(str, paths))}: nothing was graded, score 0"
        rows = rows_for("", assignment, "error", output) if assignment else rows
    elapsed = time.perf_counter() - start
    if format == "gradescope":
        write_atomic(out, gradescope_text(rows, elapsed, output, visibility))
    else:
        write_atomic(out, csv_text(rows))
    print(summary_table(rows) if rows else output)
    print(f"\n{len(rows)} rows written to {out} in {elapsed:.0f} s")
    return rows
