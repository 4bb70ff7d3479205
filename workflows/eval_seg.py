r"""Score a trained segmenter on a split (val by default): predictions on Ray Data, then mIoU.

    python -m workflows.eval_seg --checkpoint results/voc-mini-cpu-seg/final
    python -m workflows.eval_seg --checkpoint <seg run>/final --scales 1.0 0.75 1.25 --flip --crf
    ray job submit --working-dir . -- python -m workflows.eval_seg --checkpoint s3://bucket/runs/<name>-seg/final \
        --out s3://bucket/seg/<name>-val

Writes (``--out``, default ``<seg run>/pred-<split>``) ``<out>/<id>.png`` (VOC palette class
ids), ``manifest.parquet``, ``config.yaml``, and ``miou.json`` / ``miou.md`` (mIoU, pixel
accuracy, per-class IoU). Multi-scale + flip (``seg.scales``, ``seg.flip``) and DenseCRF
post-processing (``seg.crf``, with the ``pseudo.*`` CRF parameters) are optional. Killed and
started again, it keeps the PNGs that validate. Failed images: exit status 1; bad inputs are
reported before Ray starts: exit status 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_seg_flags, add_split_flags, base_parser, config_from_folders, parse_command,
                              run, seg_overrides)


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="final/ folder of a train_seg run (path or URI)")
    add_split_flags(p, "output folder (default <seg run>/pred-<split>)")
    add_seg_flags(p)
    args = parse_command(p, argv, seg_overrides)
    from cpal_ray.data import build_dataset
    from cpal_ray.distributed.stages import check_inputs, check_stage_checkpoint, run_seg_predict
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.inference.evaluate import evaluate_labels, write_label_report
    from cpal_ray.storage import location

    check_stage_checkpoint(args.checkpoint, "seg")
    cfg = config_from_folders(args, args.checkpoint)
    inputs = check_inputs(cfg, args.split, limit=args.limit)
    init_ray(args.address, args.num_cpus)
    out = output_location(args.out, "--out") if args.out else location(args.checkpoint).parent / f"pred-{args.split}"
    summary = run_seg_predict(cfg, args.checkpoint, out, split=args.split, overwrite=args.overwrite, limit=args.limit,
                              inputs=inputs)
    scores = evaluate_labels(out, build_dataset(inputs.worker_cfg.data, args.split, train=False), max_images=args.limit)
    write_label_report(scores, out, f"Segmentation mIoU ({args.split})")
    print(strict_json({"run": summary.to_dict(), "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                      "images": scores["images"], "report": str(out / "miou.md")}))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    run(main)
