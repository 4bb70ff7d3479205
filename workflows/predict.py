"""Segment your own photos with a trained segmenter: a folder of images in, palette PNGs out.

    python -m workflows.predict --checkpoint results/voc-mini-cpu-seg/final --images ~/photos --out ~/photos-seg
    python -m workflows.predict --checkpoint <seg run>/final --images ~/photos --out out/seg --flip --crf

Every .jpg/.jpeg/.png/.bmp/.webp file of ``--images`` (a local folder that every Ray node can
read: the local Ray, or shared storage) gets ``<out>/<stem>.png``: class ids 0..N in the VOC
palette (0 = background; the class names are in the checkpoint's config). ``<out>/manifest.parquet``
lists each file with the classes found (``classes``) and the status; ``--out`` may be a URI.
Started again, it keeps the PNGs that validate. An unreadable photo is a failed row (exit
status 1); an empty or missing folder, or a checkpoint that is not a segmenter's, is reported
before Ray starts (exit status 2).
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import add_seg_flags, base_parser, config_from_folders, parse_command, run, seg_overrides


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--checkpoint", required=True, help="final/ folder of a train_seg run (path or URI)")
    p.add_argument("--images", required=True, help="local folder of photos")
    p.add_argument("--out", required=True, help="output folder of the PNGs (path or URI)")
    p.add_argument("--overwrite", action="store_true", help="redo every file, even with other settings")
    add_seg_flags(p)
    args = parse_command(p, argv, seg_overrides)
    from cpal_ray.distributed.stages import check_image_folder, check_stage_checkpoint, run_seg_predict
    from cpal_ray.distributed.runtime import init_ray, output_location

    check_stage_checkpoint(args.checkpoint, "seg")
    cfg = config_from_folders(args, args.checkpoint)
    inputs = check_image_folder(cfg, args.images)
    init_ray(args.address, args.num_cpus)
    summary = run_seg_predict(cfg, args.checkpoint, output_location(args.out, "--out"), images_dir=args.images,
                              overwrite=args.overwrite, inputs=inputs)
    print(strict_json(summary.to_dict()))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    run(main)
