"""`python -m minina assignments build|grade`: the instructor's commands (see minina/assignments/build.py, grade.py)."""
import sys

HELP = "build student notebooks from the solutions, or grade submitted notebooks"


def add_arguments(parser):
    commands = parser.add_subparsers(dest="assignments_command", required=True, metavar="{build,grade}")
    build = commands.add_parser("build", help="write notebooks/assignments/*.ipynb from solutions/*.ipynb")
    build.add_argument("--check", action="store_true",
                       help="write nothing; exit 1 naming each student notebook that differs from what build writes")
    build.add_argument("--dir", default="notebooks/assignments",
                       help="the folder holding solutions/ and the student notebooks (default notebooks/assignments)")
    grade = commands.add_parser("grade", help="run submitted notebooks and write one row per (notebook, exercise)")
    grade.add_argument("paths", nargs="+", metavar="PATH", help="notebooks, or folders of them (not recursive)")
    grade.add_argument("--out", required=True, help="where to write the grades (grades.csv, or results.json)")
    grade.add_argument("--seed", type=int, default=0, help="seed of the checks' random inputs (default 0)")
    grade.add_argument("--timeout", type=float, default=300,
                       help="seconds each cell, and each exercise's checks, may run (default 300)")
    grade.add_argument("--format", choices=("csv", "gradescope"), default="csv",
                       help="csv (default) or gradescope (its autograder results.json)")


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
    if args.timeout <= 0:
        sys.exit("error: --timeout must be > 0")
    grade(args.paths, args.out, seed=args.seed, timeout=args.timeout, format=args.format)
