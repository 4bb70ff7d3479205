r"""Seed mIoU of CAMs: background-threshold sweep (or one fixed threshold), per-class IoU, plot.

    python -m workflows.eval_cams --cams out/cams --out out/seeds              # saved CAM files
    python -m workflows.eval_cams --cams out/cams/pacam --out out/seeds-pacam  # saved PACAM files
    python -m workflows.eval_cams --checkpoint <run>/final --split val --out out/seeds --threshold 0.25
    ray job submit --working-dir . -- python -m workflows.eval_cams --cams s3://bucket/cams/<name>-val \
        --out s3://bucket/seeds/<name>-val

The config is ``--config`` if given, else the ``config.yaml`` of the CAM folder (written by
make_cams) or of the checkpoint, plus the overrides. With ``--checkpoint`` the CAMs are first
computed on Ray Data into ``<out>/cams`` (``--source`` picks CAM or PACAM); with only ``--cams``
no Ray is started. Folders are local paths or URIs. Writes (``--out``, default
``<run>/seeds-<split>`` beside the checkpoint folder, or ``<cams>/seeds``) ``<out>/seeds.json``,
``seeds.md``, ``miou_vs_threshold.png`` and ``config.yaml``. Images without a usable CAM file or
without a ground-truth mask are listed and left out (never scored); the exit status is then 1.
The images scored are those the CAM folder's ``manifest.parquet`` lists (``make_cams --limit 4``
made 4), else (a folder made otherwise) the whole split; ``--ids`` names them instead.
A bad input (missing CAM folder, checkpoint that does not verify, unreadable dataset) is reported
before anything starts or is written; the exit status is then 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_cam_actor_flags, add_split_flags, base_parser, cam_actor_overrides,
                              config_from_folders, flag_overrides, parse_command, run)


def build_parser():
    p = base_parser(__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cams", help="folder of <id>.npz CAM files (make_cams output, or its pacam/)")
    src.add_argument("--checkpoint", help="compute the CAMs from this checkpoint first")
    add_split_flags(p, "report folder (default <run>/seeds-<split>, or <cams>/seeds)", overwrite="")
    p.add_argument("--source", choices=("cam", "pacam"), default=None,
                   help="with --checkpoint: which map (inference.cam_source)")
    p.add_argument("--threshold", type=float, default=None,
                   help="evaluate this background threshold only (inference.fixed_threshold)")
    p.add_argument("--ids", default=None,
                   help="file of the ids to score, one a line (default: those the CAM folder's manifest lists, "
                        "else the whole split)")
    add_cam_actor_flags(p)
    return p


def read_ids(path) -> list[str]:
    """The ids of an id file (one a line; blank lines and ``#`` comments left out)."""
    from cpal_ray.data.files import DataError
    from cpal_ray.storage import location

    try:
        lines = location(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--ids {path}: cannot read ({e})") from None
    ids = [line.split("#")[0].strip() for line in lines]
    if not any(ids):
        raise DataError(f"--ids {path}: no id in it")
    return [sid for sid in ids if sid]


def main(argv=None) -> int:
    args = parse_command(build_parser(), argv, cam_actor_overrides, lambda a: flag_overrides(
        a, ("--threshold", "inference.fixed_threshold"), ("--source", "inference.cam_source")))
    from cpal_ray.config import save_config
    from cpal_ray.data import build_dataset
    from cpal_ray.distributed.stages import check_inputs
    from cpal_ray.distributed.runtime import output_location
    from cpal_ray.inference.evaluate import evaluate_cam_dir
    from cpal_ray.inference.io import source_dir
    from cpal_ray.inference.manifest import manifest_ids
    from cpal_ray.inference.metrics import write_report
    from cpal_ray.storage import location

    cams = location(args.cams) if args.cams else None
    cfg = config_from_folders(args, cams, cams.parent if cams else None, args.checkpoint)
    source = args.source or cfg.inference.cam_source
    inputs = check_inputs(cfg, args.split, checkpoint=args.checkpoint, cam_dir=cams, source=source, limit=args.limit)
    given_ids = read_ids(args.ids) if args.ids else None
    if args.checkpoint:
        from cpal_ray.distributed.stages import run_make_cams
        from cpal_ray.distributed.runtime import init_ray

        init_ray(args.address, args.num_cpus)
        out = output_location(args.out, "--out") if args.out else \
            location(args.checkpoint).parent / f"seeds-{args.split}"
        summary = run_make_cams(cfg, args.checkpoint, out / "cams", split=args.split, source=source, limit=args.limit,
                                inputs=inputs)
        cams = source_dir(out / "cams", source)
        print(strict_json({"make_cams": {k: v for k, v in summary.to_dict().items() if k != "failures"}}))
    else:
        out = output_location(args.out, "--out") if args.out else cams / "seeds"
    save_config(inputs.cfg, out / "config.yaml")
    dataset = build_dataset(inputs.worker_cfg.data, args.split, train=False)
    ids = given_ids or manifest_ids(cams)
    results = evaluate_cam_dir(cams, dataset, cfg, max_images=args.limit, ids=ids)
    skipped = [(sid, reason) for sid, reason in dataset.skipped if ids is None or sid in ids]
    results["errors"] = [f"id {sid}: {reason}" for sid, reason in skipped] + results["errors"]
    results["n_errors"] += len(skipped)
    paths = write_report(results, out, list(results["class_names"]))
    print(strict_json({"best_miou": results["best_miou"], "best_threshold": results["best_threshold"],
                      "images": results["images"], "n_errors": results["n_errors"],
                      "errors": results["errors"][:20], **{k: str(v) for k, v in paths.items()}}))
    return 0 if results["n_errors"] == 0 else 1


if __name__ == "__main__":
    run(main)
