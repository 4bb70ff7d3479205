"""Convert an image-level label file (cls_labels.npy of the WSSS code bases) to plain JSON.

    python -m workflows.convert_labels /data/VOCdevkit/VOC2012/cls_labels.npy
    python -m workflows.convert_labels my_labels.npy /data/relabelled/cls_labels.json

The .npy file is read without running code (``cpal_ray.data.labels``); the JSON file maps each id
to its multi-hot list and is what the readers look for first (``<root>/cls_labels.json``). No Ray.
Prints the output file and the number of ids; a file that is not a label file gives exit status 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import doc_parser, run, setup_logging


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("src", help="label file to read (.npy or .json)")
    p.add_argument("dst", nargs="?", default=None, help="JSON file to write (default: src with the suffix .json)")
    args = p.parse_args(argv)
    setup_logging()
    from cpal_ray.data import convert_labels

    dst, n = convert_labels(args.src, args.dst)
    print(strict_json({"labels": str(dst), "ids": n}))
    return 0


if __name__ == "__main__":
    run(main)
