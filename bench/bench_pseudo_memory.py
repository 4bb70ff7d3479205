"""Peak driver memory of the pseudo-label job on N and 4N images: streaming means it should not grow.

    .venv/bin/python bench/bench_pseudo_memory.py            # N = 24 synthetic images of 192 px
    .venv/bin/python bench/bench_pseudo_memory.py --n 50 --size 256

Each run is a fresh subprocess (``--child``) that starts its own local Ray (2 CPUs), computes
CAMs on the fly from an untrained tiny checkpoint (scale 1.0), CRF pseudo-labels (IRN preset)
for the synthetic train split and then prints its own peak RSS (``getrusage(RUSAGE_SELF)``:
the driver only, not the Ray workers). The arrays of 4N images would add about
4N * size^2 * 20 bytes (rgb, CAMs, label) if the driver held them. The last line is the ratio
peak(4N) / peak(N). Takes 1-3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def bench_config(n: int, size: int):
    from cpal_ray.config import load_config

    return load_config(REPO / "configs" / "synthetic_tiny.yaml",
                       [f"data.synthetic_images={n}", f"data.synthetic_size={size}", "inference.scales=[1.0]",
                        "dist.num_workers=1"])


def child(args) -> None:
    """One pseudo-label run in this process; prints a JSON line with the peak RSS."""
    import ray

    from cpal_ray.distributed.stages import run_pseudo_labels

    cfg = bench_config(args.n, args.size)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.monotonic()
    cfg = cfg.replace(**{"pseudo.max_actors": 2, "inference.actor_cpus": 0.5})
    summary = run_pseudo_labels(cfg, Path(args.workdir) / f"out_{args.n}", checkpoint=Path(args.workdir) / "ckpt",
                                split="train")
    seconds = time.monotonic() - t0
    ray.shutdown()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"n": args.n, "peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 1),
                      **summary.counts}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="images of the small run (the large one has 4N)")
    p.add_argument("--size", type=int, default=192, help="side of the synthetic images")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    from cpal_ray.engine import checkpoint_state, write_checkpoint
    from cpal_ray.models import build_model

    with tempfile.TemporaryDirectory() as work:
        cfg = bench_config(args.n, args.size)
        write_checkpoint(Path(work) / "ckpt",
                         checkpoint_state(model=build_model(cfg.model, cfg.data.num_classes), cfg=cfg, epoch=0))
        peaks = []
        for n in (args.n, 4 * args.n):
            cmd = [sys.executable, __file__, "--child", "--n", str(n), "--size", str(args.size), "--workdir", work]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(result), flush=True)
            peaks.append(result["peak_rss_mb"])
    print(f"peak driver RSS: {peaks[0]:.1f} MB for N={args.n}, {peaks[1]:.1f} MB for 4N={4 * args.n}; "
          f"ratio {peaks[1] / peaks[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
