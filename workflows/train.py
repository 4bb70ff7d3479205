r"""Train CPAL (or the BCE baseline with cpal.enabled=false) on Ray Train.

    python -m workflows.train --config configs/synthetic_tiny.yaml train.epochs=2
    ray job submit --working-dir . -- python -m workflows.train --config configs/voc_resnet50_8gpu.yaml \
        train.storage_path=s3://bucket/cpal-results

train.storage_path is an absolute path every node shares or a URI (s3://…; a custom endpoint from
AWS_ENDPOINT_URL). Re-running with the same train.name and train.storage_path resumes from the
last checkpoint; Ctrl-C stops a run with one line saying the epoch it resumes from (exit status
130), and history.json keeps only the epochs that have a checkpoint. The run folder holds, as it trains, TensorBoard files (tensorboard/), history.json
and curves.png; --mlflow-uri also logs to MLflow. Bad inputs (config, dataset
folder, id list, labels, weights file) are reported before Ray starts, with nothing written; the
exit status is then 2.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_tracking_flags, base_parser, config_from_args, run, setup_logging,
                              tracking_overrides)


def main(argv=None) -> int:
    p = base_parser(__doc__)
    add_tracking_flags(p)
    args = p.parse_args(argv)
    setup_logging()
    args.overrides = [*args.overrides, *tracking_overrides(args)]
    from cpal_ray.distributed.runtime import init_ray
    from cpal_ray.distributed.trainer import run_training
    from cpal_ray.engine.inputs import check_training_inputs

    cfg = check_training_inputs(config_from_args(args))
    init_ray(args.address, args.num_cpus)
    result = run_training(cfg)
    print(strict_json({"run_dir": str(result.run_dir), "final": str(result.final_dir),
                      "epoch": result.metrics.get("epoch"), "loss": result.metrics.get("loss")}))
    return 0


if __name__ == "__main__":
    run(main)
