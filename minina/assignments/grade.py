"""Grade submitted notebooks: run each in a fresh kernel, decide every verdict here, outside the student's process.

The kernel runs the notebook's cells, then only answers requests (minina.assignments.probe): this process draws
every input from the seed, computes the expected values with minina's own code, sends the inputs, and compares
what comes back (checks.run_exercise with RemoteHandles). A row's points are its exercise's points when that
comparison passes, else 0: nothing the notebook prints, patches or defines sets them.

Run as root, the kernel runs as an unprivileged user (`user`, default nobody) in a private copy of the notebook,
so it cannot write the output, read the grader's files or signal the grader. A cell, or an exercise's checks,
get `timeout` seconds (then an interrupt, and the kernel is killed if it ignores it); the whole notebook gets
`notebook_timeout`, after which its process group is killed. The output is written by this process only, at
the end, atomically.
"""
import base64
import io
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import nbformat
import torch
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from .checks import EXERCISES, GraderError, Handle, Result, restore, run_exercise
from .probe import REPLY_MARKER, encode
from .rules import source_violations
from .submission import csv_text, gradescope_text, plan, rows_for, summary_table, write_atomic

PING_TIMEOUT = 5  # seconds an interrupted kernel has to become idle before it is killed
TIMED_OUT = "minina: the cell ran out of time"  # the evalue nbclient reports for a timed-out cell


class _KernelManager(AsyncKernelManager):
    """A kernel manager whose connection file the unprivileged kernel may read."""

    owner = None  # (uid, gid) or None

    def write_connection_file(self, **kwargs):
        super().write_connection_file(**kwargs)
        if self.owner:
            os.chown(self.connection_file, *self.owner)


class Kernel:
    """A kernel running one notebook in a private folder (as `user` when root); cells and requests by timeout."""

    def __init__(self, notebook, folder, user, timeout, notebook_timeout):
        self.notebook, self.folder, self.timeout = notebook, Path(folder), timeout
        self.running, self.killed, self.nonce = "starting the kernel", None, secrets.token_hex(8)
        km = _KernelManager(kernel_name="python3")
        km.connection_file = str(self.folder / "kernel.json")
        self.popen = dict(cwd=str(self.folder), env=_kernel_env(self.folder, user))
        if user is not None:
            km.owner = user
            self.popen.update(user=user[0], group=user[1], extra_groups=[], umask=0o077)
        self.client = NotebookClient(notebook, km=km, timeout=timeout, kernel_name="python3", allow_errors=True,
                                     interrupt_on_timeout=True, record_timing=False, coalesce_streams=True,
                                     error_on_timeout={"ename": "TimeoutError", "evalue": TIMED_OUT, "traceback": []},
                                     on_cell_executed=self._note_reply)
        self.reply = None
        self.watchdog = threading.Timer(notebook_timeout, self.kill, args=(f"ran longer than {notebook_timeout:g} "
                                                                           f"s (the notebook's time limit)",))
        self.watchdog.daemon = True

    def kill(self, why):
        """Kill the kernel's whole process group, however it handles interrupts."""
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
        try:
            return restore(torch.load(io.BytesIO(base64.b64decode(lines[0][len(marker):])), weights_only=True))
        except Exception as error:
            raise GraderError(f"the reply while {what} could not be read ({type(error).__name__})") from None

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


def _kernel_env(folder, user=None):
    """The grader's environment, with every place the kernel writes moved into its private folder.

    MININA_COMPILE=0 unless the grader's environment sets it: with a private, empty cache every notebook would
    compile minina's compiled backend from scratch, which costs more than it saves at the notebooks' sizes (the
    chunked backend computes the same values up to rounding). user: (uid, gid) the kernel runs as, named in USER
    and LOGNAME so that nothing looks for the grader's own user's files.
    """
    env = dict(os.environ)
    env.update(HOME=str(folder), IPYTHONDIR=str(folder / ".ipython"), MPLCONFIGDIR=str(folder / ".matplotlib"),
               XDG_CACHE_HOME=str(folder / ".cache"), TRITON_CACHE_DIR=str(folder / ".triton"),
               TORCHINDUCTOR_CACHE_DIR=str(folder / ".inductor"), JUPYTER_RUNTIME_DIR=str(folder / ".jupyter"))
    env.setdefault("MININA_COMPILE", "0")
    if user is not None:
        import pwd

        env.update(USER=pwd.getpwuid(user[0]).pw_name, LOGNAME=pwd.getpwuid(user[0]).pw_name)
    return env


def unprivileged_user(name):
    """(uid, gid) of user `name` when this process is root (kernels then run as that user), else None.

    name "root" keeps kernels as root, unprotected, for a machine where no other user can run this Python.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    if name == "root":
        warnings.warn("--user root: the notebooks run as root and can reach the grader and its output")
        return None
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--user: no user {name!r}; pass an unprivileged user") from None
    if entry.pw_uid == 0:
        raise ValueError(f"--user: {name!r} is root; pass an unprivileged user (or --user root to run unprotected)")
    interpreter = Path(sys.executable)
    if not _can_run(interpreter, entry.pw_uid, entry.pw_gid):
        raise ValueError(f"--user: {name!r} cannot run this Python ({interpreter} or a folder above it is closed "
                         f"to that user); install Python where it can, or pass --user root to run unprotected")
    return entry.pw_uid, entry.pw_gid


def _can_run(path, uid, gid):
    """Whether uid (group gid) may execute path, following symbolic links, from the permission bits."""
    try:
        chain = [path, *path.parents] + ([path.resolve(), *path.resolve().parents] if path.is_symlink() else [])
        for part in chain:
            mode, owner, group = part.stat().st_mode, part.stat().st_uid, part.stat().st_gid
            bit = 0o100 if owner == uid else 0o010 if group == gid else 0o001
            if not mode & bit:
                return False
    except OSError:
        return False
    return True


class RemoteHandle(Handle):
    """A notebook object in the kernel: calls go to the probe, within the exercise's time limit."""

    def __init__(self, kernel, name, exercise_id, forbid, seed, deadline):
        super().__init__(None, exercise_id, forbid)
        self.kernel, self.name, self.seed, self.deadline = kernel, name, seed, deadline

    def reply(self, args, kwargs, observe=None):
        payload = dict(kind="call", name=self.name, args=list(args), kwargs=kwargs, forbid=list(self.forbid),
                       observe=observe, seed=self.seed)
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
    """The Result of one exercise, its checks run here on the kernel's objects; violations of the source rule
    (rules.source_violations) fail an attempted exercise before any check runs."""
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


def cell_errors(notebook, count):
    """'cell N: Name: value' for each of the first count code cells whose outputs hold an error."""
    errors = []
    for index, cell in enumerate(notebook.cells[:count]):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                errors.append(f"cell {index}: {output.get('ename')}: {str(output.get('evalue'))[:120]}")
    return errors


def run_notebook(notebook, assignment, folder, seed, timeout, notebook_timeout, user):
    """The Results of assignment's exercises on notebook, run in a kernel in folder."""
    results, specs = [], [e for e in EXERCISES.values() if e.assignment == assignment]
    count = len(notebook.cells)
    try:
        with Kernel(notebook, folder, user, timeout, notebook_timeout) as kernel:
            for index, cell in enumerate(notebook.cells[:count]):
                if cell.cell_type == "code":
                    first = cell.source.strip().split("\n")[0][:60]
                    kernel.run(cell, index, timeout, f"running cell {index} ({first})")
            errors = cell_errors(notebook, count)
            sources = [(i, cell.source) for i, cell in enumerate(notebook.cells[:count]) if cell.cell_type == "code"]
            for spec in specs:
                results.append(grade_exercise(kernel, spec, seed, errors, source_violations(sources, spec)))
    except GraderError as error:  # the kernel was killed or died: what is left could not be checked
        done = {result.exercise for result in results}
        results += [Result(spec.id, "error", f"the notebook could not be graded to the end: {error}",
                           max_points=spec.points) for spec in specs if spec.id not in done]
    except Exception as error:  # the kernel would not start
        results = [Result(spec.id, "error", f"the kernel could not run: {type(error).__name__}: {error}",
                          max_points=spec.points) for spec in specs]
    return results


def grade_notebook(path, assignment, seed=0, timeout=300, notebook_timeout=None, user=None, note=""):
    """The grade rows of one notebook graded as assignment (dicts with COLUMNS); never raises for a bad one."""
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:
        return rows_for(path, assignment, "error", f"not a readable notebook: {type(error).__name__}: {error}")
    folder = Path(tempfile.mkdtemp(prefix="minina-grade-"))
    try:
        if user is not None:
            os.chown(folder, *user)
        os.chmod(folder, 0o700)
        shutil.copyfile(path, folder / Path(path).name)
        results = run_notebook(notebook, assignment, folder, seed, timeout, notebook_timeout or 4 * timeout, user)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [dict(notebook=str(path), assignment=assignment, exercise=r.exercise, status=r.status,
                 points=r.points if r.status == "passed" else 0, max_points=r.max_points,
                 message="; ".join(m for m in (note, r.message) if m)) for r in results]


def load_extra_checks(path):
    """Run an instructor's file of @exercise checks, so they are graded like the public ones."""
    import runpy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--extra-checks: no file {path}")
    before = set(EXERCISES)
    runpy.run_path(str(path), run_name="minina_extra_checks")
    return sorted(set(EXERCISES) - before)


def grade(paths, out, seed=0, timeout=300, format="csv", assignment=None, notebook_timeout=None, user="nobody",
          visibility="visible", extra_checks=None):
    """Grade the submission(s) in paths, write out (CSV or Gradescope JSON) at the end, print the summary.

    Returns the rows. Each folder in paths is one submission (see minina.assignments.submission).
    """
    start = time.perf_counter()
    if extra_checks:
        load_extra_checks(extra_checks)
    owner = unprivileged_user(user)
    graded, ignored, unknown = plan(paths, assignment)
    rows = []
    for path, name, note in graded:
        rows += grade_notebook(path, name, seed, timeout, notebook_timeout, owner, note)
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
