"""The self-check machinery: run an exercise's checks on a student's code and say passed, failed or not attempted.

An exercise is a function registered with @exercise(id, names, forbid=...): it receives a Handle per notebook name
and a torch.Generator seeded by the caller, draws inputs, runs the student's objects through call() (in-process for
check(), in the kernel for the grader: see probe.py), compares what comes back with minina's own reference, and
raises CheckFailed with a reason that names the failing case. The verdict is always decided where the exercise
runs, so the grader's is out of the notebook's reach. A stub that still raises its NotImplementedError (raised by
the notebook's code with the exercise id as its message, see probe.is_stub), or a value left as `...`, means "not
attempted"; any other NotImplementedError is an error of the student's code.
Tolerances: one per dtype, in TOLERANCES; a value passes when |got - expected| <= tol * (1 + |expected|).
"""
import copy
import dataclasses
import math
import os
from typing import Callable

import torch

from ..scores import NeuralScore
from . import probe

# Relative-and-absolute tolerance per dtype: float64 results should agree with the reference to round-off of a
# few dozen operations; float32 allows for a different summation order; half precisions for their 8/11-bit mantissa.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
STATUSES = ("passed", "failed", "not attempted", "error")


class CheckFailed(Exception):
    """Why a student's answer is wrong, in words shown to the student (never the solution)."""


class NotAttempted(Exception):
    """The student's function is still its stub (probe.is_stub): the exercise is "not attempted"."""


class GraderError(Exception):
    """The checks could not run to a verdict (the kernel died, a reply was unreadable): an "error" row."""


@dataclasses.dataclass
class Exercise:
    id: str  # "A1.masked_softmax": assignment, dot, name
    names: tuple  # the notebook names the grader passes to run, in order
    run: Callable  # run(*handles, generator=...) raises CheckFailed, returns None when passed
    points: int = 1
    forbid: tuple = ()  # labels of probe.FORBIDDABLE: calls that fail the exercise while the student's code runs

    @property
    def assignment(self):
        return self.id.split(".")[0]


@dataclasses.dataclass
class Result:
    exercise: str
    status: str  # one of STATUSES
    message: str = ""
    points: float = 0
    max_points: float = 1

    @property
    def passed(self):
        return self.status == "passed"

    def line(self):
        """The one line a student sees."""
        mark = {"passed": "✓", "failed": "✗", "not attempted": "·", "error": "!"}[self.status]
        return f"{mark} {self.exercise}: {self.status}" + (f": {self.message}" if self.message else "")


EXERCISES = {}  # id -> Exercise, filled by minina.assignments.exercises
_RESULTS = {}  # id -> the latest Result of check() in this session, for passed()


def exercise(id, names, points=1, forbid=()):
    """Register the decorated function as the check of exercise `id` on the notebook objects `names`.

    forbid: the calls (labels of minina.assignments.probe.FORBIDDABLE) that fail the exercise when the student's
    code makes them, however they were imported.
    """
    unknown = set(forbid) - set(probe.FORBIDDABLE)
    if unknown:
        raise ValueError(f"exercise {id!r}: forbid names unknown calls {sorted(unknown)}")

    def register(run):
        EXERCISES[id] = Exercise(id, tuple(names), run, points, tuple(forbid))
        return run
    return register


def default_seed():
    """The base seed of the notebooks: $MININA_SEED, else 0."""
    return int(os.environ.get("MININA_SEED", 0))


class Handle:
    """A notebook object as a check sees it: call() runs it (in-process here, in the kernel for the grader)."""

    def __init__(self, obj, exercise_id="", forbid=()):
        self.obj, self.exercise_id, self.forbid = obj, exercise_id, tuple(forbid)

    def reply(self, args, kwargs, observe=None):
        """The reply dict of probe.execute on copies of the arguments, as the grader would receive it."""
        args, kwargs = copy.deepcopy((args, kwargs))
        return restore(probe.execute(self.obj, args, kwargs, self.forbid, observe))

    def value(self):
        return restore(probe.portable(self.obj))


class Opaque:
    """Stands for an object a student's function returned that is not plain data (its class has that object's
    type name, so messages name it)."""

    def __repr__(self):
        return f"<{type(self).__name__} object>"


def restore(value):
    """Plain data from probe.portable back into Python objects: NeuralScores rebuilt, other objects Opaque."""
    if isinstance(value, dict) and probe.OPAQUE in value:
        return type(str(value[probe.OPAQUE])[:80], (Opaque,), {})()
    if isinstance(value, dict) and probe.SCORE in value:
        try:
            score = NeuralScore(**value[probe.SCORE])
            score.load_state_dict(value["state"])
        except Exception as error:  # options or weights NeuralScore does not accept
            return type(f"NeuralScore that cannot be rebuilt ({error})"[:120], (Opaque,), {})()
        return score.to(next(iter(value["state"].values())).dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(restore(x) for x in value)
    if isinstance(value, dict):
        return {key: restore(x) for key, x in value.items()}
    return value


def run_exercise(exercise_id, objects, seed=None, handles=None):
    """The Result of exercise_id's checks on objects (or on handles to them), never raising for a bad answer.

    The verdict is decided here, from what the calls return; handles let the grader run them in another process.
    """
    if exercise_id not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    spec = EXERCISES[exercise_id]
    if handles is None and len(objects) != len(spec.names):
        raise TypeError(f"check({exercise_id!r}, ...) takes {len(spec.names)} object(s), {', '.join(spec.names)}; "
                        f"got {len(objects)}")
    result = Result(exercise_id, "passed", max_points=spec.points, points=spec.points)
    if handles is None and any(obj is Ellipsis for obj in objects):
        return dataclasses.replace(result, status="not attempted", points=0)
    handles = handles or [Handle(obj, exercise_id, spec.forbid) for obj in objects]
    seed = default_seed() if seed is None else seed
    with torch.random.fork_rng(devices=[]):  # the check never moves the notebook's own random stream
        torch.manual_seed(seed)
        try:
            spec.run(*handles, generator=torch.Generator().manual_seed(seed))
        except NotAttempted:
            return dataclasses.replace(result, status="not attempted", points=0)
        except NotImplementedError as error:  # raised here by what the student's function returned, not a stub
            return dataclasses.replace(result, status="failed", message=f"raised NotImplementedError: {error}",
                                       points=0)
        except CheckFailed as failure:
            return dataclasses.replace(result, status="failed", message=str(failure), points=0)
        except GraderError as error:
            return dataclasses.replace(result, status="error", message=str(error), points=0)
    return result


def check(exercise_id, *objects, seed=None):
    """Check a student's answer to exercise_id and print one line: passed, failed (and why) or not attempted.

    Never raises for a wrong answer, so the notebook goes on. Returns None; passed(exercise_id) tells the outcome.
    """
    result = run_exercise(exercise_id, objects, seed)
    _RESULTS[exercise_id] = result
    print(result.line())


def passed(exercise_id):
    """Whether the latest check(exercise_id, ...) of this session passed (False if it never ran)."""
    return exercise_id in _RESULTS and _RESULTS[exercise_id].passed


# ----------------------------------------------------------------------------------------- helpers for checks


def random_tensor(shape, dtype, generator, low=None, high=None):
    """Standard normal (or uniform in [low, high)) numbers of the given shape, drawn in float64 then cast."""
    if low is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)


def call(case, function, *args, observe=None, **kwargs):
    """The output of function(*args, **kwargs), or (output, observations) when observe is given (see probe.execute).

    function is a Handle to the student's object (or a plain callable of the checker's own). A stub's
    NotImplementedError becomes NotAttempted; any other error, a forbidden call or a time-out is a CheckFailed naming case.
    """
    if not isinstance(function, Handle):
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise CheckFailed(f"{case}: raised {type(error).__name__}: {error}") from None
    reply = function.reply(args, kwargs, observe)
    if reply["forbidden"]:
        raise CheckFailed(f"{function.exercise_id} called {', '.join(reply['forbidden'])} ({case}): write it "
                          f"yourself")
    error = reply["error"]
    if error and error["stub"]:
        raise NotAttempted(error["message"])
    if error and error["type"] == "TimeoutError":
        raise CheckFailed(f"{case}: {error['message']}")
    if error:
        raise CheckFailed(f"{case}: raised {error['type']}: {error['message']}")
    return reply["output"] if observe is None else (reply["output"], reply["observed"])


def compare(case, got, expected, what="result", tol=None):
    """Raise CheckFailed naming case unless tensor got matches expected in shape, dtype, NaN-freedom and value."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{case}: {what} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{case}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        hint = "a mask is torch.bool" if expected.dtype == torch.bool else "keep the input dtype"
        raise CheckFailed(f"{case}: {what} has dtype {got.dtype}, expected {expected.dtype} ({hint})")
    if expected.dtype == torch.bool:
        wrong = got != expected
        if wrong.any():
            where = tuple(wrong.nonzero()[0].tolist())
            raise CheckFailed(f"{case}: {what} is {bool(got[where])} at index {where} where it should be "
                              f"{bool(expected[where])} ({int(wrong.sum())} wrong entries)")
        return
    got64, expected64 = got.detach().double(), expected.detach().double()
    bad = torch.isnan(got64) & ~torch.isnan(expected64)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        raise CheckFailed(f"{case}: {what} is NaN at index {where} where it should be a number "
                          f"({int(bad.sum())} NaN values)")
    tol = TOLERANCES.get(expected.dtype, 1e-10) if tol is None else tol
    error = (got64 - expected64).abs() / (1 + expected64.abs())
    error = torch.where(torch.isnan(expected64) & torch.isnan(got64), torch.zeros_like(error), error)
    error = torch.where(got64 == expected64, torch.zeros_like(error), error)  # equal infinities
    if error.numel() and not error.max() <= tol:
        where = tuple(int(i) for i in torch.unravel_index(error.nan_to_num(math.inf).argmax(), error.shape))
        transposed = (got.dim() >= 2 and got.shape[-1] == got.shape[-2]
                      and torch.allclose(got64.transpose(-2, -1), expected64, rtol=tol, atol=tol))
        raise CheckFailed(f"{case}: {what} is off by {error.max().item():.2g} (relative) at index {where}: got "
                          f"{got64[where].item():.6g}, expected {expected64[where].item():.6g} (tolerance "
                          f"{tol:g} for {expected.dtype})" + ("; it is the transpose of the expected matrix"
                                                              if transposed else ""))


def compare_gradients(case, function, reference, args, generator, indices, **kwargs):
    """Compare the gradients autograd takes through the student's function for args[indices] with reference's."""
    inputs = [a.detach().clone().requires_grad_() if i in indices else a for i, a in enumerate(args)]
    expected = reference(*inputs, **kwargs)
    grad_output = random_tensor(expected.shape, expected.dtype, generator)
    expected_grads = torch.autograd.grad(expected, [inputs[i] for i in indices], grad_output)
    _, observed = call(case, function, *args, observe={"grad": (grad_output, list(indices))}, **kwargs)
    if isinstance(observed["grads"], str):
        raise CheckFailed(f"{case}: {observed['grads']}")
    for index, got, wanted in zip(indices, observed["grads"], expected_grads):
        if got is None:
            raise CheckFailed(f"{case}: no gradient flows back to argument {index}")
        compare(case, got, wanted, f"the gradient of argument {index}")


def diagnose(failure, got, mistakes, tol):
    """failure, or failure naming the usual mistake (a key of mistakes: name -> tensor) that got equals."""
    if isinstance(got, torch.Tensor):
        for name, mistake in mistakes.items():
            if mistake.shape == got.shape and torch.allclose(got.detach().double(), mistake.double(), rtol=tol,
                                                             atol=tol, equal_nan=True):
                return CheckFailed(f"{failure}; your output equals {name}")
    return failure
