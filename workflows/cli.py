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

from workflows.common import interrupted, run

# command: (module of workflows/, the first line of its docstring)
COMMANDS = {
    "train": ("train", "Train CPAL (or the BCE baseline with cpal.enabled=false) on Ray Train."),
    "sweep": ("sweep", "Ray Tune ablation sweep: every trial trains with Ray Train, then evaluates seed mIoU."),
    "make-cams": ("make_cams", "Multi-scale (+flip) CAM files for one dataset split, on Ray Data."),
    "eval-cams": ("eval_cams", "Seed mIoU of CAMs: background-threshold sweep (or one fixed threshold), per-class "
                               "IoU, plot."),
    "pseudo-labels": ("pseudo_labels", "CRF pseudo-labels (IRN recipe) for a dataset split on Ray Data, then their "
                                       "mIoU against the GT."),
    "convert-labels": ("convert_labels", "Convert an image-level label file (cls_labels.npy of the WSSS code bases) "
                                         "to plain JSON."),
    "demo": ("demo", "The demo: CAM baseline vs CPAL on the bundled real photos, end to end, with a report."),
    "train-affinity": ("train_affinity", "Train IRN's boundary (affinity) network on the CRF seeds of a CAM run, on "
                                         "Ray Train."),
    "make-masks": ("make_masks", "Pseudo masks by random walk (IRN) for a dataset split, on Ray Data, then the "
                                 "Table-4 scores."),
    "train-seg": ("train_seg", "Train the segmentation network (DeepLabV3 head on the config's backbone) on pseudo "
                               "masks, on Ray Train."),
    "eval-seg": ("eval_seg", "Score a trained segmenter on a split (val by default): predictions on Ray Data, then "
                             "mIoU."),
    "predict": ("predict", "Segment your own photos with a trained segmenter: a folder of images in, palette PNGs "
                           "out."),
    "pipeline": ("pipeline", "The whole WSSS pipeline for one config: CAM training -> CAMs -> CRF -> affinity -> "
                             "masks -> segmenter -> val mIoU."),
}
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
