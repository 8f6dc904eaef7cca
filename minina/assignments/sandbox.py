"""The sandbox a submitted notebook's kernel runs in: bubblewrap (bwrap), one per notebook, Linux only.

The kernel sees a read-only Python (its prefixes and every folder on its sys.path), minina's package folder (not
the checkout around it, so the solutions stay out of sight), the system's /usr, a few files of /etc, the dataset
folder ($MININA_DATA), and one writable private folder: the notebook's copy, its home and caches, the kernel's
Unix-domain sockets. It runs in its own user, PID, mount, network, IPC and UTS namespaces (its uid is 65534 in
there, no capabilities, no network, no /proc of the grader), with a clean environment, and dies with the grader:
killing the sandbox's first process ends every process started in it, detached ones included. `memory` bounds
the address space of every process in it (RLIMIT_AS, through prlimit).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import minina

ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf", "hosts", "localtime",
       "mime.types", "fonts", "alternatives")  # what a Python kernel reads of /etc; nothing secret (no shadow)
TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")  # the system's programs and libraries
FLAGS = ("--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns",
         "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv")
PASSED_ON = ("PYTHONPATH", "TRITON_INTERPRET", "MININA_DATA")  # of the grader's environment, when set


def interpreter_paths(python=sys.executable):
    """The folders the kernel's interpreter reads: its prefixes, its real path and its sys.path (.pth files
    included), asked of the interpreter itself with the environment the kernel gets."""
    env = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
    program = "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, *sys.path]))"
    found = json.loads(subprocess.run([python, "-c", program], env=env, cwd="/", capture_output=True, text=True,
                                      check=True, timeout=60).stdout)
    return [Path(python).resolve().parent.parent, *(Path(path) for path in found if path)]


def kernel_environment(folder):
    """The kernel's whole environment: a short list of variables, its caches in its folder, never the grader's."""
    folder = Path(folder)
    env = dict(PATH=f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin", HOME=str(folder),
               LANG="C.UTF-8", TERM="dumb", USER="nobody", LOGNAME="nobody", MPLBACKEND="Agg",
               IPYTHONDIR=str(folder / ".ipython"),
               MPLCONFIGDIR=str(folder / ".matplotlib"), XDG_CACHE_HOME=str(folder / ".cache"),
               TRITON_CACHE_DIR=str(folder / ".triton"), TORCHINDUCTOR_CACHE_DIR=str(folder / ".inductor"),
               JUPYTER_RUNTIME_DIR=str(folder / ".jupyter"), JPY_PARENT_PID="1")  # 1: no console banner
    env.update({name: os.environ[name] for name in PASSED_ON if os.environ.get(name)})
    for name in ("PYTHONPATH", "MININA_DATA"):  # by real path: a link to the folder shown is not in the sandbox
        if name in env:
            env[name] = os.pathsep.join(os.path.realpath(part) for part in env[name].split(os.pathsep) if part)
    return env


def _readable(paths):
    """The outermost existing folders among paths, minina's checkout replaced by minina's package folder alone."""
    package = Path(minina.__file__).resolve().parent
    keep = {package}
    for path in paths:
        path = Path(path).resolve()
        if not path.is_dir():
            continue
        if path in package.parents and path.name not in ("site-packages", "dist-packages"):
            continue  # a checkout (editable install, PYTHONPATH=.): its notebooks/ and solutions stay out
        keep.add(path)
    return sorted(p for p in keep if not any(q != p and p.is_relative_to(q) for q in keep))  # outermost only


def sandbox_command(folder, paths, hidden=(), memory=None):
    """The argv prefix that runs a command in folder's sandbox (see the module docstring).

    paths: the folders to show read-only (interpreter_paths()); hidden: files inside them the kernel must not read
    (an --extra-checks file), shown as empty; memory: bytes of address space per process, or None.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError("bwrap not found")
    command = [bwrap, *FLAGS, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # first: binds below go on top
    for name in TOP:
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    command += [arg for name in ETC if (Path("/etc") / name).exists() for arg in
                ("--ro-bind", f"/etc/{name}", f"/etc/{name}")]
    data = os.environ.get("MININA_DATA")
    shown = _readable([*paths, *([data] if data else [])])
    for path in shown:
        command += ["--ro-bind", str(path), str(path)]
    for path in map(Path.resolve, map(Path, hidden)):  # only those a shown folder holds need hiding
        command += ["--ro-bind", "/dev/null", str(path)] if any(path.is_relative_to(p) for p in shown) else []
    command += ["--bind", str(folder), str(folder), "--chdir", str(folder)]
    for name, value in kernel_environment(folder).items():
        command += ["--setenv", name, value]
    return memory_limit(memory) + command + ["--"]


def memory_limit(memory, required=True):
    """prlimit's argv prefix bounding each process's address space to memory bytes ([] for None, or where prlimit
    is missing and not required)."""
    prlimit = shutil.which("prlimit")
    if memory is None or (prlimit is None and not required):
        return []
    if prlimit is None:
        raise FileNotFoundError("prlimit (util-linux) not found: the memory bound needs it")
    return [prlimit, f"--as={int(memory)}", "--"]


def sandbox_available(paths):
    """(True, "") when a sandbox starts here and runs the interpreter, else (False, what to install or enable)."""
    if sys.platform != "linux":
        return False, f"no sandbox on {sys.platform}: grading isolates notebooks with bubblewrap, on Linux only"
    if shutil.which("bwrap") is None:
        return False, "bubblewrap is not installed (apt-get install bubblewrap, dnf install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="minina-sandbox-") as folder:
        command = sandbox_command(folder, paths) + [  # the package is found there (without importing torch)
            sys.executable, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('minina') is None)"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return False, f"bubblewrap did not start: {error}"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
        return False, (f"bubblewrap cannot start a sandbox here ({reason}); enable unprivileged user namespaces "
                       f"(sysctl kernel.unprivileged_userns_clone=1, or a container run with a seccomp profile "
                       f"that allows them)")
    return True, ""
