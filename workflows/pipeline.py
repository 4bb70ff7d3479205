r"""The whole WSSS pipeline for one config: CAM training -> CAMs -> CRF -> affinity -> masks -> segmenter -> val mIoU.

    python -m workflows.pipeline --config configs/voc_mini_cpu.yaml --out results/pipeline/voc-mini
    python -m workflows.pipeline --config configs/voc_mini_cpu.yaml --out results/pipeline/voc-mini-bce cpal.enabled=false
    ray job submit --working-dir . -- python -m workflows.pipeline --config configs/voc_resnet50_8gpu.yaml \
        --out s3://bucket/pipeline/voc-r50

Every stage is the one its own command runs (train, pseudo_labels, train_affinity, make_masks,
train_seg, eval_seg), in ``--out`` (``cpal_ray.pipeline.wsss`` gives the layout). Stages whose
outputs are complete are skipped: a training stage with a verified ``final/`` of all its epochs,
and every image whose PNG validates; so a killed run, started again with the same command,
restarts where it stopped. Prints and writes ``<out>/pipeline.json``: the Table-4 numbers (CAM
seeds, with CRF, pseudo masks, on the training images), the segmenter's val mIoU (Table 5) and
each stage's wall time. Bad inputs are reported before Ray starts: exit status 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import add_tracking_flags, base_parser, config_from_args, run, setup_logging, tracking_overrides


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--out", default=None, help="output folder (default <train.storage_path>/pipeline-<train.name>)")
    add_tracking_flags(p)
    args = p.parse_args(argv)
    setup_logging()
    args.overrides = [*args.overrides, *tracking_overrides(args)]
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.pipeline.wsss import run_pipeline
    from cpal_ray.engine.inputs import check_training_inputs

    cfg = check_training_inputs(config_from_args(args))
    out = output_location(args.out or f"{cfg.train.storage_path}/pipeline-{cfg.train.name}", "--out")
    init_ray(args.address, args.num_cpus)
    result = run_pipeline(cfg, out, say=print)
    print(strict_json({"out": str(out), "pipeline": str(out / "pipeline.json"),
                      "seconds": {k: round(v, 1) for k, v in result["timings"].items()}}))
    return 0


if __name__ == "__main__":
    run(main)
