r"""Ray Tune ablation sweep: every trial trains with Ray Train, then evaluates seed mIoU.

    python -m workflows.sweep --space tune_spaces.k_tau --config configs/synthetic_tiny.yaml train.epochs=1
    python -m workflows.sweep --space tune_spaces.table1 --config configs/voc_resnet50_8gpu.yaml \
        --repeats 3 --gpus-per-trial 2
    python -m workflows.sweep --space tune_spaces.bank --search random --num-samples 4 --config configs/x.yaml
    python -m workflows.sweep --restore results/sweeps/sweep-k_tau
    ray job submit --working-dir . -- \
        python -m workflows.sweep --space tune_spaces.table3 --config configs/voc_resnet50_8gpu.yaml \
        --storage s3://bucket/sweeps --max-concurrent 2

Results go to <storage>/<name>/ (results.md, results.csv, best_config.yaml, bars.png, heatmap_k_tau.png);
<storage> is a local path or a URI, by default <train.storage_path>/sweeps. Trials at once:
--max-concurrent, else dist.max_concurrent_trials, else what the cluster holds at the start (a
cluster scaling from zero must be told). An interrupted sweep (Ctrl+C, a lost driver, `ray job
stop`) continues with --restore <that folder>: finished trials are kept, unfinished and errored
ones resume from their last checkpoint. A trial whose node is lost is retried by Tune the same way.
"""
from __future__ import annotations

from cpal_ray.formatting import strict_json

from workflows.common import (add_tracking_flags, base_parser, config_from_args, flag_overrides, run, setup_logging,
                              tracking_overrides)


def parse_args(argv=None):
    p = base_parser(__doc__)
    p.add_argument("--space", default=None, help="space module, e.g. tune_spaces.k_tau (or just k_tau)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every point N times, with train.seed, train.seed+1, ... (table: mean ± std)")
    p.add_argument("--search", choices=("grid", "random", "optuna"), default="grid",
                   help="grid: every point; random: --num-samples points drawn from the lists (each run with "
                        "every seed); optuna: needs `pip install optuna`")
    p.add_argument("--num-samples", type=int, default=8, help="points drawn by --search random/optuna")
    p.add_argument("--gpus-per-trial", type=int, default=0, help="GPUs per trial = Ray Train workers with 1 GPU each")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (dist.max_concurrent_trials; 0 = what the cluster holds now)")
    p.add_argument("--eval-max-images", type=int, default=0, help="evaluate seeds on the first N images (0 = all)")
    p.add_argument("--eval-split", default="val",
                   help="split whose seeds score each trial: val (data.val_split), train (the WSSS protocol: the "
                        "training images) or an id-list name")
    p.add_argument("--name", default=None, help="experiment name (default: sweep-<space>)")
    p.add_argument("--storage", default=None,
                   help="folder (path or URI) holding the experiment (default: <train.storage_path>/sweeps)")
    p.add_argument("--restore", default=None,
                   help="continue the sweep in this experiment folder; Ray Tune unpickles its tuner.pkl, so restore "
                        "only folders you trust (one without this project's sweep.json record is refused)")
    p.add_argument("--retry-errored", action="store_true",
                   help="with --restore: also run again the points recorded as failed for an error retrying cannot "
                        "fix (trials that failed otherwise, e.g. on a lost node, are resumed by every --restore)")
    p.add_argument("--smoke-test", action="store_true",
                   help="2 points, 1 epoch of 2 steps, single-scale eval on 8 images")
    add_tracking_flags(p)
    args = p.parse_args(argv)
    args.overrides = [*args.overrides, *tracking_overrides(args),
                      *flag_overrides(args, ("--max-concurrent", "dist.max_concurrent_trials"))]
    if not args.restore and not args.space:
        p.error("--space is required (or --restore PATH)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging()
    from cpal_ray.distributed.runtime import init_ray, output_location
    from cpal_ray.distributed.tune import restore_sweep, run_sweep

    if args.restore:
        init_ray(args.address, args.num_cpus)
        outcome = restore_sweep(args.restore, retry_errored=args.retry_errored)
    else:
        from cpal_ray.config import check_run_name
        from cpal_ray.engine.inputs import check_training_inputs
        from cpal_ray.sweeps.spaces import load_space

        space = load_space(args.space)
        cfg = check_training_inputs(config_from_args(args))
        name = check_run_name(args.name or f"sweep-{space.__name__.rsplit('.', 1)[-1]}", "--name")
        init_ray(args.address, args.num_cpus)
        storage = output_location(args.storage, "--storage") if args.storage else \
            output_location(cfg.train.storage_path, "train.storage_path") / "sweeps"
        outcome = run_sweep(cfg, space, storage / name, seeds=args.repeats, search=args.search,
                            num_samples=args.num_samples, gpus_per_trial=args.gpus_per_trial,
                            eval_max_images=args.eval_max_images,
                            eval_split=args.eval_split,
                            smoke_test=args.smoke_test)
    report = {"experiment": str(outcome.experiment_dir), **outcome.summary, "files": outcome.files}
    if outcome.summary["unfinished"]:
        report["restore"] = f"python -m workflows.sweep --restore {outcome.experiment_dir}"
    print(strict_json(report))
    return 0


if __name__ == "__main__":
    run(main)
