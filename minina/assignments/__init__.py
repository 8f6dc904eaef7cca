"""minina's course assignments: the self-checks students call, and the instructor's build and grade commands.

In a notebook: `from minina.assignments import check, passed`, then `check("A1.masked_softmax", masked_softmax)`
after each exercise prints one line: passed, failed with the reason, or not attempted. The package core never
imports this subpackage.
"""
from .checks import EXERCISES, TOLERANCES, Result, check, passed
from .exercises import ASSIGNMENTS

__all__ = ["check", "passed", "Result", "TOLERANCES", "ASSIGNMENTS", "EXERCISES"]
