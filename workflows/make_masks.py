r"""Pseudo masks by random walk (IRN) for a dataset split, on Ray Data, then the Table-4 scores.

    python -m workflows.make_masks --checkpoint results/voc-mini-cpu-affinity/final \
        --cams results/voc-mini-cpu/pseudo-labels-train/cams --seeds results/voc-mini-cpu/pseudo-labels-train
    python -m workflows.make_masks --checkpoint <affinity run>/final --cams <cams> affinity.beta=8 affinity.exp_times=6
    ray job submit --working-dir . -- python -m workflows.make_masks --checkpoint s3://bucket/runs/<name>-affinity/final \
        --cams s3://bucket/pseudo/<name>/cams --out s3://bucket/masks/<name>

Each image's CAMs (``--cams``: make_cams / pseudo_labels CAM files) are walked over the
affinities of the boundary network (``--checkpoint``: a train_affinity run) and thresholded with
IRN's constant background score: ``affinity.walk_radius``, ``beta``, ``exp_times``,
``bg_threshold``, ``walk_mode`` (IRN's defaults). The config is ``--config`` if given, else the
checkpoint's ``config.yaml``, plus the overrides. Writes (``--out``, default
``<affinity run>/masks-<split>``) ``<out>/<id>.png`` (VOC palette, class ids), ``manifest.parquet``,
``config.yaml`` and ``masks_miou.json``; with ``--seeds`` (the CRF seed folder) it also prints the
three Table-4 numbers: CAM seeds, with CRF, pseudo masks. Killed and started again, it keeps the
PNGs that validate and ends with the same files. Failed images: exit status 1; bad inputs are
reported before Ray starts, with nothing written: exit status 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import add_split_flags, base_parser, config_from_folders, flag_overrides, parse_command, run


def build_parser():
    p = base_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="final/ folder of a train_affinity run (path or URI)")
    p.add_argument("--cams", required=True, help="folder of <id>.npz CAM files of the split")
    p.add_argument("--seeds", default=None, help="the CRF seed folder: also score it and the CAMs (Table 4)")
    add_split_flags(p, "output folder (default <affinity run>/masks-<split>)", "train",
                    "dataset split (default train: WSSS scores masks there)")
    p.add_argument("--actors", type=int, default=None, help="the most mask actors (affinity.max_actors, 0 = no limit)")
    p.add_argument("--no-eval", action="store_true", help="skip the mIoU evaluation")
    return p


def main(argv=None) -> int:
    args = parse_command(build_parser(), argv, lambda a: flag_overrides(a, ("--actors", "affinity.max_actors")))
    from cpal_ray.data import build_dataset
    from cpal_ray.distributed.stages import check_inputs, check_stage_checkpoint, run_make_masks
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.inference.evaluate import evaluate_cam_dir, evaluate_labels, write_json
    from cpal_ray.storage import location

    check_stage_checkpoint(args.checkpoint, "affinity")
    cfg = config_from_folders(args, args.checkpoint)
    inputs = check_inputs(cfg, args.split, cam_dir=args.cams, limit=args.limit)
    init_ray(args.address, args.num_cpus)
    out = output_location(args.out, "--out") if args.out else location(args.checkpoint).parent / f"masks-{args.split}"
    summary = run_make_masks(cfg, args.checkpoint, out, cam_dir=args.cams, split=args.split, overwrite=args.overwrite,
                             limit=args.limit, inputs=inputs)
    report = {"run": summary.to_dict()}
    if not args.no_eval:
        dataset = build_dataset(inputs.worker_cfg.data, args.split, train=False)
        masks = evaluate_labels(out, dataset, max_images=args.limit)
        write_json(masks, out / "masks_miou.json")
        report["table4"] = {"pseudo_mask": masks["miou"]}
        if args.seeds:
            seeds = evaluate_cam_dir(args.cams, dataset, inputs.cfg, max_images=args.limit)
            crf = evaluate_labels(args.seeds, dataset, max_images=args.limit)
            report["table4"] = {"cam": seeds["best_miou"], "cam_bg_threshold": seeds["best_threshold"],
                                "crf": crf["miou"], "crf_frac_ignored": crf["frac_ignored"], "pseudo_mask": masks["miou"]}
    print(strict_json(report))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    run(main)
