"""``cpal-ray <command> …``: the console script installed with the package, beside the
``python -m workflows.<command>`` forms that ``ray job submit`` uses. Same arguments.

    cpal-ray train --config configs/synthetic_tiny.yaml train.epochs=2
    cpal-ray demo
    cpal-ray make-cams --checkpoint <run>/final --split val

``cpal-ray --help`` lists the commands without importing torch or Ray (the descriptions are
here, tests keep them equal to the first line of each command's docstring); a mistyped command
gets the nearest names; ``cpal-ray <command> --help`` shows that command's options and examples.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import sys

from workflows.commands import COMMANDS
from workflows.common import interrupted, run

EPILOG = """examples:
  cpal-ray train --config configs/synthetic_tiny.yaml train.epochs=2
  cpal-ray make-cams --checkpoint results/synthetic-tiny/final --split val
  cpal-ray train --config configs/synthetic_tiny.yaml --print-config

Run 'cpal-ray <command> --help' for a command's options, examples and what it writes."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("cpal-ray")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpal-ray", description="CPAL weakly supervised semantic segmentation on Ray.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"cpal-ray {version()}")
    sub = p.add_subparsers(dest="command", title="commands", metavar="<command>", required=True)
    for name, (_, description) in COMMANDS.items():
        sub.add_parser(name, help=description.rstrip("."), add_help=False)
    return p


def suggest(word: str, choices, what: str) -> str:
    """``unknown <what> 'x'`` with the nearest of ``choices`` (difflib) when any is close."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {word!r}{hint}"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0].startswith("-"):
            build_parser().parse_args(argv)  # --help, --version, or a usage error (exit 2)
        command = argv[0]
        if command not in COMMANDS:
            build_parser().error(suggest(command, COMMANDS, "command") + " (cpal-ray --help lists them)")
        module = importlib.import_module(f"workflows.{COMMANDS[command][0]}")
    except KeyboardInterrupt as e:
        interrupted(e)
    run(module.main, argv[1:])


if __name__ == "__main__":
    main()
