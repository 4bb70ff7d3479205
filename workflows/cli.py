"""``cpal-ray <command> …``: the console script installed with the package, beside the
``python -m workflows.<command>`` forms that ``ray job submit`` uses. Same arguments.

    cpal-ray train --config configs/synthetic_tiny.yaml train.epochs=2
    cpal-ray demo
    cpal-ray make-cams --checkpoint <run>/final --split val
"""
from __future__ import annotations

import importlib
import sys

from workflows.common import run

COMMANDS = {"train": "train", "sweep": "sweep", "make-cams": "make_cams", "eval-cams": "eval_cams",
            "pseudo-labels": "pseudo_labels", "convert-labels": "convert_labels", "demo": "demo",
            "train-affinity": "train_affinity", "make-masks": "make_masks", "train-seg": "train_seg",
            "eval-seg": "eval_seg", "predict": "predict", "pipeline": "pipeline"}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: cpal-ray {{{','.join(COMMANDS)}}} [options]  (cpal-ray <command> --help)", file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    module = importlib.import_module(f"workflows.{COMMANDS[argv[0]]}")
    run(module.main, argv[1:])


if __name__ == "__main__":
    main()
