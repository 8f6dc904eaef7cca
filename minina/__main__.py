"""The minina command line: `python -m minina COMMAND --help`."""
import argparse
import importlib

# command -> module that defines HELP, add_arguments(parser) and main(args); main raises argparse.ArgumentError
# for a mistake in the arguments that argparse itself cannot see (a GPU that is not there, JSON keys)
COMMANDS = {
    "demo": "minina.demo",
    "study-learnability": "minina.study",
    "train": "minina.train",
    "bench": "minina.bench",
    "assignments": "minina.assignments.cli",
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line (what went wrong, where to look) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None):
    parser = _Parser(prog="python -m minina", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules, parsers = {}, {}
    for name, module_name in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        parsers[name] = commands.add_parser(name, help=modules[name].HELP)
        modules[name].add_arguments(parsers[name])
    args = parser.parse_args(argv)
    try:
        modules[args.command].main(args)
    except argparse.ArgumentError as error:
        parsers[args.command].error(str(error))


if __name__ == "__main__":
    main()
