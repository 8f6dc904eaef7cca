"""`python -m minina assignments build|grade|autograder`: the instructor's commands (see build.py, grade.py,
autograder.py)."""
import sys

HELP = "build student notebooks from the solutions, grade submitted notebooks, or build a Gradescope autograder"


def add_arguments(parser):
    commands = parser.add_subparsers(dest="assignments_command", required=True,
                                     metavar="{build,grade,autograder}")
    build = commands.add_parser("build", help="write notebooks/assignments/*.ipynb from solutions/*.ipynb")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 naming each student notebook that differs from what build writes")
    build.add_argument("--dir", default="notebooks/assignments",
                       help="the folder holding solutions/ and the student notebooks (default notebooks/assignments)")
    grade = commands.add_parser("grade", help="run submitted notebooks and write one row per (notebook, exercise)")
    grade.add_argument("paths", nargs="+", metavar="PATH",
                       help="notebooks, or folders of them (not recursive); each folder is one submission")
    grade.add_argument("--out", required=True, help="where to write the grades (grades.csv, or results.json)")
    grade.add_argument("--format", choices=("csv", "gradescope"), default="csv",
                       help="csv (default) or gradescope (its autograder results.json)")
    add_grading_arguments(grade)
    autograder = commands.add_parser("autograder", help="build Gradescope's autograder.zip for one assignment")
    autograder.add_argument("assignment", help="the assignment it grades, e.g. A1")
    autograder.add_argument("--out", default="autograder.zip", help="the zip to write (default autograder.zip)")
    add_grading_arguments(autograder, pin=False)


def add_grading_arguments(parser, pin=True):
    parser.add_argument("--seed", type=int, default=0, help="seed of the checks' random inputs (default 0)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds each cell, and each exercise's checks, may run (default 300)")
    parser.add_argument("--notebook-timeout", type=float, default=None,
                        help="seconds the whole notebook, checks included, may run before its kernel is killed "
                             "(default 4 x --timeout)")
    if pin:
        parser.add_argument("--assignment", default=None,
                            help="grade every submission as this assignment (e.g. A4), whatever the notebook says")
        parser.add_argument("--unsafe", action="store_true",
                            help="where no sandbox starts (no bubblewrap, user namespaces blocked, not Linux), grade "
                                 "without one instead of refusing, with a warning")
    parser.add_argument("--memory", type=float, default=8,
                        help="GiB of address space each process of a notebook's kernel may map (default 8)")
    parser.add_argument("--visibility", default="visible",
                        choices=("visible", "hidden", "after_due_date", "after_published"),
                        help="Gradescope visibility of the tests (default visible)")
    parser.add_argument("--extra-checks", default=None, metavar="FILE",
                        help="an instructor's Python file of @exercise checks, graded like the public ones")


def main(args):
    try:
        from .build import build
        from .grade import grade
    except ImportError as error:  # nbformat and nbclient come with Jupyter and with minina's dev extra
        sys.exit(f"error: the assignments commands need nbformat and nbclient ({error}); "
                 f"pip install nbformat nbclient ipykernel")
    if args.assignments_command == "build":
        try:
            problems = build(args.dir, check=args.check)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: {error}")
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            sys.exit(1)
        print("student notebooks are up to date" if args.check else f"student notebooks written to {args.dir}")
        return
    if args.timeout <= 0 or (args.notebook_timeout is not None and args.notebook_timeout <= 0) or args.memory <= 0:
        sys.exit("error: --timeout, --notebook-timeout and --memory must be > 0")
    from .exercises import ASSIGNMENTS

    if args.assignment is not None and args.assignment not in ASSIGNMENTS:
        sys.exit(f"error: unknown assignment {args.assignment!r}; known: {', '.join(ASSIGNMENTS)}")
    if args.assignments_command == "autograder":
        from .autograder import build_autograder

        try:
            path = build_autograder(args.assignment, args.out, seed=args.seed, timeout=args.timeout,
                                    notebook_timeout=args.notebook_timeout, visibility=args.visibility,
                                    extra_checks=args.extra_checks, memory=args.memory)
        except (FileNotFoundError, RuntimeError) as error:
            sys.exit(f"error: {error}")
        print(f"Gradescope autograder for {args.assignment} written to {path}")
        return
    try:
        grade(args.paths, args.out, seed=args.seed, timeout=args.timeout, format=args.format,
              assignment=args.assignment, notebook_timeout=args.notebook_timeout, visibility=args.visibility,
              extra_checks=args.extra_checks, unsafe=args.unsafe, memory=int(args.memory * (1 << 30)))
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
