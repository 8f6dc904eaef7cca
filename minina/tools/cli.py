"""The minina command line: `python -m minina COMMAND --help`."""
import argparse

from ..assignments import cli as assignments
from . import bench, demo, study, train

# command -> module that defines HELP, add_arguments(parser) and main(args); main raises argparse.ArgumentError
# for a mistake in the arguments that argparse itself cannot see (a GPU that is not there, JSON keys)
COMMANDS = {
    "demo": demo,
    "study-learnability": study,
    "train": train,
    "bench": bench,
    "assignments": assignments,
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (what went wrong, where to look) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = _Parser(prog="python -m minina", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, module in COMMANDS.items():
        parsers[name] = commands.add_parser(name, help=module.HELP)
        module.add_arguments(parsers[name])
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command].main(args)
    except argparse.ArgumentError as error:
        parsers[args.command].error(str(error))
