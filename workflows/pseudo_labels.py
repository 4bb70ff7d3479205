r"""CRF pseudo-labels (IRN recipe) for a dataset split on Ray Data, then their mIoU against the GT.

    python -m workflows.pseudo_labels --cams out/cams-train --split train --out out/pseudo
    python -m workflows.pseudo_labels --checkpoint <run>/final --split train --out out/pseudo --preset amn
    python -m workflows.pseudo_labels --checkpoint <run>/final --out out/pseudo --mode crf_argmax pseudo.bg_threshold=0.2
    ray job submit --working-dir . -- python -m workflows.pseudo_labels --checkpoint s3://bucket/runs/<name>/final \
        --out s3://bucket/pseudo/<name> --gpu

CAMs come from ``--cams`` (make_cams files) or are computed from ``--checkpoint`` into
``<out>/cams``; ``--out`` defaults to ``<run>/pseudo-labels-<split>`` beside the checkpoint (or
CAM) folder; all of them are local paths or URIs. The config is ``--config`` if given, else the
``config.yaml`` of the CAM folder or of the checkpoint, plus the overrides. Writes
``<out>/<id>.png`` (VOC palette, 255 = ignore), ``<out>/manifest.parquet`` (one row per id),
``<out>/pseudo_labels_miou.json`` and ``config.yaml``. CRF actors take ``pseudo.actor_cpus``
CPUs each and their pool grows with the cluster (up to ``--crf-actors``). Killed and started
again, it skips the PNGs that validate and ends with the same files. Images that fail are listed
in the summary and the manifest; the exit status is then 1. A bad input (missing CAM folder,
checkpoint that does not verify, unreadable dataset) is reported before Ray starts, with nothing
written; the exit status is then 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_cam_actor_flags, add_split_flags, base_parser, cam_actor_overrides,
                              config_from_folders, flag_overrides, parse_command, run)


def build_parser():
    p = base_parser(__doc__)
    p.add_argument("--cams", default=None, help="folder of <id>.npz CAM files (else computed from --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="checkpoint or final/ folder (CAMs on the fly)")
    add_split_flags(p, "output folder of the PNGs (default <run>/pseudo-labels-<split>)", "train")
    p.add_argument("--preset", choices=("irn", "amn", "custom"), default=None, help="conf_fg/conf_bg preset (pseudo.preset)")
    p.add_argument("--mode", choices=("irn", "crf_argmax"), default=None, help="pseudo-label rule (pseudo.mode)")
    p.add_argument("--crf-actors", type=int, default=None,
                   help="the most CRF actors; the pool grows with the cluster up to it (pseudo.max_actors, 0 = no limit)")
    p.add_argument("--cpus-per-crf", type=float, default=None, help="CPUs per CRF actor (pseudo.actor_cpus)")
    p.add_argument("--no-eval", action="store_true", help="skip the mIoU evaluation")
    add_cam_actor_flags(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parse_command(parser, argv, cam_actor_overrides, lambda a: flag_overrides(
        a, ("--preset", "pseudo.preset"), ("--mode", "pseudo.mode"), ("--crf-actors", "pseudo.max_actors"),
        ("--cpus-per-crf", "pseudo.actor_cpus")))
    if args.cams is None and args.checkpoint is None:
        parser.error("give --cams (saved CAM files) or --checkpoint (CAMs computed on the fly)")
    from cpal_ray.storage import location

    from cpal_ray.data import build_dataset
    from cpal_ray.distributed.stages import check_inputs, pseudo_labels_spec, run_pseudo_labels
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.inference.evaluate import evaluate_labels, write_json
    from cpal_ray.inference.manifest import check_run_spec

    cams_parent = location(args.cams).parent if args.cams else None  # a pacam/ folder: the config is above it
    cfg = config_from_folders(args, args.cams, cams_parent, args.checkpoint)
    inputs = check_inputs(cfg, args.split, checkpoint=None if args.cams else args.checkpoint, cam_dir=args.cams,
                          source=cfg.inference.cam_source, limit=args.limit)
    out = output_location(args.out, "--out") if args.out else \
        location(args.checkpoint or args.cams).parent / f"pseudo-labels-{args.split}"
    check_run_spec(out, pseudo_labels_spec(inputs, args.split, cam_dir=args.cams, checkpoint=args.checkpoint),
                   args.overwrite, write=False)
    init_ray(args.address, args.num_cpus)
    summary = run_pseudo_labels(cfg, out, cam_dir=args.cams, checkpoint=args.checkpoint, split=args.split,
                                overwrite=args.overwrite, limit=args.limit, inputs=inputs)
    report = {"run": summary.to_dict()}
    if not args.no_eval:
        dataset = build_dataset(inputs.worker_cfg.data, args.split, train=False)
        scores = evaluate_labels(out, dataset, max_images=args.limit)
        write_json(scores, out / "pseudo_labels_miou.json")
        report["miou"] = {k: scores[k] for k in ("miou", "pixel_acc", "frac_ignored", "images", "n_errors")}
    print(strict_json(report))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    run(main)
