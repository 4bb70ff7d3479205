"""The demo: CAM baseline vs CPAL on the bundled real photos, end to end, with a report.

    python -m workflows.demo                    # embedded defaults (configs/voc_mini_cpu.yaml)
    python -m workflows.demo train.epochs=2     # any dotted override
"""
from __future__ import annotations

import time

from workflows.common import base_parser, config_from_args, run, setup_logging

DEFAULT_CONFIG = "configs/voc_mini_cpu.yaml"  # shipped in the package: found from any directory


def main(argv=None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--out", default="results/demo", help="output folder (report.md, figures, runs)")
    p.add_argument("--keep", action="store_true", help="keep an earlier demo folder (default: start fresh)")
    args = p.parse_args(argv)
    setup_logging()
    from cpal_ray.pipeline.baseline_vs_cpal import run_demo
    from cpal_ray.distributed.runtime import init_ray

    cfg = config_from_args(args, DEFAULT_CONFIG)
    t0 = time.perf_counter()
    init_ray(args.address, args.num_cpus)
    result = run_demo(cfg, args.out, fresh=not args.keep)
    print(f"[demo] finished in {time.perf_counter() - t0:.0f}s; report: {result['report']}")
    return 0


if __name__ == "__main__":
    run(main)
