"""The ``power-retention`` command line: one subcommand per module.

Each module named in ``COMMANDS`` defines ``add_arguments(parser)`` and ``run(args)``; it is
imported only when its subcommand is used, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("power_retention.demo", "the main job: a demonstration on the embedded default"),
    "metamorphose": ("power_retention.metamorphosis.command", "transformer -> power retention"),
    "generate": ("power_retention.serving.generate",
                 "stream a continuation of a prompt from a model folder, with statistics"),
    "serve": ("power_retention.serving.serve",
              "OpenAI-compatible HTTP server with continuous batching"),
    "train": ("power_retention.training.train", "train a causal LM on the embedded corpus"),
    "icl": ("power_retention.evaluation.icl", "in-context learning curves: loss vs position"),
    "wsfr": ("power_retention.evaluation.wsfr", "weight-state FLOP ratio of the time mixings"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="power-retention",
        description="Power retention: linear-cost attention with a fixed-size state.")
    group = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {name: group.add_parser(name, help=help_text, description=help_text,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
                  for name, (_, help_text) in COMMANDS.items()}
    # The command is the first word; only its module is imported to declare its arguments.
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_arguments(subparsers[command])
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
