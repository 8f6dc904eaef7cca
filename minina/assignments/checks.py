"""The self-check machinery: run an exercise's checks on a student's code and say passed, failed or not attempted.

An exercise is a function registered with @exercise(id, names): it receives the student's objects (the values of
`names` in the notebook) and a torch.Generator seeded by the caller, compares them with minina's own reference on
random inputs of several shapes and dtypes, and raises CheckFailed with a reason that names the failing case.
A stub that still raises NotImplementedError (or a value left as `...`) means "not attempted".
Tolerances: one per dtype, in TOLERANCES; a value passes when |got - expected| <= tol * (1 + |expected|).
"""
import dataclasses
import json
import math
import os
from typing import Callable

import torch

# Relative-and-absolute tolerance per dtype: float64 results should agree with the reference to round-off of a
# few dozen operations; float32 allows for a different summation order; half precisions for their 8/11-bit mantissa.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
STATUSES = ("passed", "failed", "not attempted", "error")
GRADE_MARKER = "MININA-GRADE "  # the grader reads the line of check output that starts with this


class CheckFailed(Exception):
    """Why a student's answer is wrong, in words shown to the student (never the solution)."""


@dataclasses.dataclass
class Exercise:
    id: str  # "A1.masked_softmax": assignment, dot, name
    names: tuple  # the notebook names the grader passes to run, in order
    run: Callable  # run(*objects, generator=...) raises CheckFailed, returns None when passed
    points: int = 1

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


def exercise(id, names, points=1):
    """Register the decorated function as the check of exercise `id` on the notebook objects `names`."""
    def register(run):
        EXERCISES[id] = Exercise(id, tuple(names), run, points)
        return run
    return register


def default_seed():
    """The base seed of the notebooks: $MININA_SEED, else 0."""
    return int(os.environ.get("MININA_SEED", 0))


def is_stub(error):
    """Whether error is, or wraps, the NotImplementedError of an unwritten exercise (Triton wraps it, for one)."""
    return isinstance(error, NotImplementedError) or "NotImplementedError" in repr(error) + repr(error.__cause__)


def run_exercise(exercise_id, objects, seed=None):
    """The Result of exercise_id's checks on objects, never raising for a bad answer."""
    if exercise_id not in EXERCISES:
        raise ValueError(f"unknown exercise {exercise_id!r}; known: {', '.join(sorted(EXERCISES))}")
    spec = EXERCISES[exercise_id]
    if len(objects) != len(spec.names):
        raise TypeError(f"check({exercise_id!r}, ...) takes {len(spec.names)} object(s), {', '.join(spec.names)}; "
                        f"got {len(objects)}")
    result = Result(exercise_id, "passed", max_points=spec.points, points=spec.points)
    if any(obj is Ellipsis for obj in objects):
        return dataclasses.replace(result, status="not attempted", points=0)
    seed = default_seed() if seed is None else seed
    with torch.random.fork_rng(devices=[]):  # the check never moves the notebook's own random stream
        torch.manual_seed(seed)
        try:
            spec.run(*objects, generator=torch.Generator().manual_seed(seed))
        except NotImplementedError:
            return dataclasses.replace(result, status="not attempted", points=0)
        except CheckFailed as failure:
            return dataclasses.replace(result, status="failed", message=str(failure), points=0)
        except Exception as error:  # the student's code failed in a way no case anticipated
            if is_stub(error):
                return dataclasses.replace(result, status="not attempted", points=0)
            return dataclasses.replace(result, status="failed", points=0,
                                       message=f"raised {type(error).__name__}: {error}")
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


def grade_in_namespace(exercise_id, namespace, seed):
    """The grader's probe, run inside the executed notebook: print the Result of exercise_id on namespace's names."""
    spec = EXERCISES[exercise_id]
    missing = [name for name in spec.names if name not in namespace]
    if missing:
        result = Result(exercise_id, "error", f"{', '.join(missing)} not defined after running the notebook",
                        max_points=spec.points)
    else:
        result = run_exercise(exercise_id, [namespace[name] for name in spec.names], seed)
    print(GRADE_MARKER + json.dumps(dataclasses.asdict(result)))


# ----------------------------------------------------------------------------------------- helpers for checks


def random_tensor(shape, dtype, generator, low=None, high=None):
    """Standard normal (or uniform in [low, high)) numbers of the given shape, drawn in float64 then cast."""
    if low is None:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return (low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype)


def call(case, function, *args, **kwargs):
    """function(*args, **kwargs), with an error other than NotImplementedError reported as a failure of case."""
    try:
        return function(*args, **kwargs)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as error:
        if is_stub(error):
            raise NotImplementedError(str(error)) from error
        raise CheckFailed(f"{case}: raised {type(error).__name__}: {error}") from None


def compare(case, got, expected, what="result", tol=None):
    """Raise CheckFailed naming case unless tensor got matches expected in shape, dtype, NaN-freedom and value."""
    if not isinstance(got, torch.Tensor):
        raise CheckFailed(f"{case}: {what} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{case}: {what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if got.dtype != expected.dtype:
        raise CheckFailed(f"{case}: {what} has dtype {got.dtype}, expected {expected.dtype} (keep the input dtype)")
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


def gradcheck(case, function, *inputs):
    """torch.autograd.gradcheck in float64 of function at inputs, reported as a failure of case."""
    inputs = [t.detach().double().requires_grad_(t.is_floating_point()) for t in inputs]
    try:
        ok = torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-5, raise_exception=False)
    except (NotImplementedError, CheckFailed):
        raise
    except Exception as error:
        raise CheckFailed(f"{case}: autograd failed: {type(error).__name__}: {error}") from None
    if not ok:
        raise CheckFailed(f"{case}: the gradient autograd computes through your code disagrees with finite "
                          f"differences (torch.autograd.gradcheck in float64)")
