"""The minina command line: `python -m minina COMMAND --help`."""
import argparse
import importlib

# command -> module that defines HELP, add_arguments(parser) and main(args)
COMMANDS = {
    "demo": "minina.demo",
    "study-learnability": "minina.study",
    "train": "minina.train",
    "bench": "minina.bench",
    "assignments": "minina.assignments.cli",
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minina", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {}
    for name, module_name in COMMANDS.items():
        modules[name] = importlib.import_module(module_name)
        modules[name].add_arguments(commands.add_parser(name, help=modules[name].HELP))
    args = parser.parse_args(argv)
    modules[args.command].main(args)


if __name__ == "__main__":
    main()
