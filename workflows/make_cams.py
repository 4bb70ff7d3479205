r"""Multi-scale (+flip) CAM files for one dataset split, on Ray Data.

    python -m workflows.make_cams --checkpoint results/synthetic-tiny/final --split val --out out/cams
    python -m workflows.make_cams --checkpoint <run>/final --source both --out out/cams inference.scales=[1.0]
    ray job submit --working-dir . -- python -m workflows.make_cams --checkpoint s3://bucket/runs/<name>/final \
        --out s3://bucket/cams/<name>-val --gpu --actors-per-gpu 2

The config is ``--config`` if given, else the checkpoint's ``config.yaml``, plus the overrides.
Checkpoint and output are local paths or URIs (s3://…). Writes (``--out``, default
``<run>/cams-<split>`` beside the checkpoint folder) ``<out>/<id>.npz`` (CAM) and/or
``<out>/pacam/<id>.npz`` (PACAM; arrays ``classes``, ``cams``, ``size``, no pickle),
``<out>/manifest.parquet`` and ``<out>/config.yaml``. The CAM actors' resources come from the
flags or ``inference.*``; their pool grows with the cluster. Running again skips the files that
validate. Images that fail (missing, corrupt) are listed in the JSON summary and the manifest;
the others are written, and the exit status is then 1. A bad input (a checkpoint that is missing
or does not verify, a dataset that cannot be read, an output folder holding CAMs of other
settings without --overwrite) is reported before Ray starts, with nothing written, and the exit
status is 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_cam_actor_flags, add_split_flags, base_parser, cam_actor_overrides,
                              config_from_folders, parse_command, run)


def build_parser():
    p = base_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint or final/ folder of a training run (path or URI)")
    add_split_flags(p, "output folder of the CAM files (default <run>/cams-<split>)", "val",
                    "dataset split: train, val or an id-list name (default val)",
                    "recompute every file, even with other settings")
    p.add_argument("--source", choices=("cam", "pacam", "both"), default="cam", help="which maps to save")
    add_cam_actor_flags(p)
    return p


def main(argv=None) -> int:
    args = parse_command(build_parser(), argv, cam_actor_overrides)
    from cpal_ray.distributed.stages import check_inputs, make_cams_spec, run_make_cams
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.inference.manifest import check_run_spec
    from cpal_ray.storage import location

    cfg = config_from_folders(args, args.checkpoint)
    inputs = check_inputs(cfg, args.split, checkpoint=args.checkpoint, source=args.source, limit=args.limit)
    out = output_location(args.out, "--out") if args.out else location(args.checkpoint).parent / f"cams-{args.split}"
    check_run_spec(out, make_cams_spec(inputs, args.split, args.checkpoint), args.overwrite, write=False)
    init_ray(args.address, args.num_cpus)
    summary = run_make_cams(cfg, args.checkpoint, out, split=args.split, source=args.source, limit=args.limit,
                            overwrite=args.overwrite, inputs=inputs)
    print(strict_json(summary.to_dict()))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    run(main)
