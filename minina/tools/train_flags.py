"""The flags of `python -m minina train`: one per TrainConfig field, and --config NAME for a paper setting.

config_from_args builds the TrainConfig; it checks nothing: train() checks the config once, where the run starts.
"""
import argparse
import dataclasses
import json

from ..attention import BACKENDS
from ..models import MODEL_KINDS
from ..scores import RELIABLE_SCORE_OPTIONS
from .config import DEFAULT_DATASETS, DTYPES, PAPER_CONFIGS, TrainConfig
from .data import IMAGE_DATASETS, TEXT_DATASETS
from .train_tasks import TRAIN_TASKS

# help for the flags whose default alone says too little
FLAG_HELP = {
    "dataset": f"lm: {', '.join(sorted(TEXT_DATASETS))}; vit: {', '.join(IMAGE_DATASETS)} or the path of an "
               f"ImageFolder tree (default: {DEFAULT_DATASETS['lm']} for lm, {DEFAULT_DATASETS['vit']} for vit)",
    "out": "output folder (default runs/<task>-<dataset>-<kind>-seed<seed>)",
    "image_size": "vit: resize the images to this many pixels a side (default: as stored)",
    "train_size": "vit: train on only the first this many training images (default: all)",
    "proj_dim": "d' of the neural score (default: head_dim / 32, at least 2, the paper's)",
    "device": "auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N",
}


def _json_object(text):
    """argparse type of --score-options: a JSON object, or a message showing how to write one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as {json.dumps(RELIABLE_SCORE_OPTIONS)} "
                                         f"(names and strings in double quotes), got {text!r}")
    return value


def add_config_flags(parser):
    """One flag per TrainConfig field, and --config NAME to start from a named config."""
    defaults = TrainConfig()
    parser.add_argument("--config", choices=sorted(PAPER_CONFIGS),
                        help="start from a named config (the paper's full-scale settings); flags override it")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if field.name == "download":
            parser.add_argument(flag, action="store_true", default=None, help="fetch missing dataset files")
        elif field.name == "compile":
            parser.add_argument(flag, action="store_true", default=None,
                                help="torch.compile the model for training (needs a C++ compiler on CPU)")
        elif field.name == "score_options":
            parser.add_argument(flag, type=_json_object, metavar="JSON",
                                help="more NeuralScore keyword arguments as a JSON object, e.g. the learnability "
                                     "study's pick (minina.scores.RELIABLE_SCORE_OPTIONS): "
                                     f"{json.dumps(RELIABLE_SCORE_OPTIONS)}")
        else:
            value_type = {int: int, float: float}.get(type(default), str)
            if field.name in ("eval_batches", "image_size", "train_size", "proj_dim"):
                value_type = int
            help = FLAG_HELP.get(field.name, f"default {default}")
            names = {"task": tuple(TRAIN_TASKS), "kind": MODEL_KINDS, "backend": BACKENDS}.get(field.name)
            if field.name == "dtype":
                parser.add_argument(flag, choices=DTYPES, help=help)
            else:  # names shown, not checked here: train() checks every value once, these with the others
                metavar = "{" + ",".join(names) + "}" if names else field.name.upper()
                parser.add_argument(flag, type=value_type, metavar=metavar, help=help)


def config_from_args(args):
    """The TrainConfig the command line describes: a named config (or the defaults) with the flags given on top."""
    base = PAPER_CONFIGS[args.config] if args.config else TrainConfig()
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)
             if getattr(args, field.name) is not None}
    if not args.config:  # recompute the defaults that depend on other flags (the task's dataset, the folder name)
        given = {"dataset": None, "out": None, **given}
    return dataclasses.replace(base, **given)
