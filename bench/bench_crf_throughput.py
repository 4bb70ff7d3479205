"""Ray Data CRF pseudo-labels vs a bare multiprocessing.Pool on the same images (targets:
Ray Data >= 0.9x the Pool's images/s; 2 workers >= 1.8x one worker).

    python bench/bench_crf_throughput.py [--quick] [--images 10] [--scale 0.5]

The per-image work is the same function everywhere, ``label_file``: load one prepared
``.npz`` (a real voc-mini photo + synthetic CAMs of its positive classes, blurred from its
ground-truth mask) and run ``cpal_ray.inference.pseudo.irn_pseudo_label`` (two DenseCRFs,
IRN's parameters). Photos are resized by ``--scale`` (0.5 by default) to keep the
run short (median 241x301 px); every CRF is ~4x cheaper than at full size, which makes any per-image overhead of
the machinery *more* visible, not less.

Variants, alternated (pool-1, pool-2, ray-1, ray-2, then reversed, ...), each timed end to end
(pool / actor start-up included, as a job would pay it):
- pool-W: ``multiprocessing.Pool(W).imap_unordered(label_file, paths, chunksize=1)``, its
  workers at niceness 15 like Ray's workers (``--pool-nice``: Ray starts every worker with
  ``RAY_worker_niceness`` = 15; on a shared machine a nice-0 pool would simply out-compete it);
- ray-W: ``ray.data.from_items(paths).map_batches(Labeler, compute=ActorPoolStrategy(size=W),
  num_cpus=0.5, batch_size=1)`` consumed by the driver, the pattern of
  ``cpal_ray.distributed.stage_runner`` (actor pool, fractional CPUs, one image per call).
Ray runs locally with 2 CPUs (``address="local"``; shut down at the end). Also printed: the
CPU seconds the driver and Ray's own processes (raylet, GCS, agents) spend during each run.
The last two lines: 2 workers / 1 worker (Ray Data) and Ray Data / Pool, steady-state images/s.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C


def label_file(path: str) -> dict:
    """The per-image job: .npz (rgb, cams, classes) -> IRN pseudo-label; returns a small row."""
    from cpal_ray.inference.pseudo import IGNORE, irn_pseudo_label

    t0, c0 = time.perf_counter(), time.process_time()
    with np.load(path) as z:
        rgb, cams, classes = z["rgb"], z["cams"], z["classes"]
    label = irn_pseudo_label(rgb, cams, classes)
    return {"path": path, "ignored": float(np.mean(label == IGNORE)), "seconds": time.perf_counter() - t0,
            "cpu": time.process_time() - c0, "done_at": time.time()}


FIELDS = ("path", "ignored", "seconds", "cpu", "done_at")


class Labeler:
    """Ray Data stage: ``{"path": (B,)}`` -> the columns ``FIELDS`` via ``label_file``."""

    def __call__(self, batch: dict) -> dict:
        rows = [label_file(str(p)) for p in batch["path"]]
        return {k: np.array([r[k] for r in rows]) for k in FIELDS}


class Run:
    """One end-to-end run: total seconds, seconds to the first finished image, and the
    steady-state rate (n - W) / (t_last - t_W): images/s once the first round (pool or actor
    start-up + W images) is over, the figure that matters for a dataset of 10k images."""

    def __init__(self, t_start: float, t_end: float, rows: list[dict], workers: int):
        done = sorted(float(r["done_at"]) for r in rows)
        self.cpu_per_image = float(np.median([float(r["cpu"]) for r in rows]))
        self.wall_per_image = float(np.median([float(r["seconds"]) for r in rows]))
        self.total = t_end - t_start
        self.first = done[0] - t_start
        k = min(workers, len(done) - 1)
        span = done[-1] - done[k - 1] if k >= 1 else 0.0
        self.steady = (len(done) - k) / span if span > 0 else len(done) / self.total
        self.overhead_cpu = 0.0  # driver + Ray system processes, CPU s during the run


def prepare_images(out: Path, count: int, scale: float) -> list[str]:
    """Write ``count`` voc-mini photos (scaled) with synthetic CAMs as .npz; returns their paths."""
    from PIL import Image, ImageFilter

    from cpal_ray.config import DataConfig
    from cpal_ray.data import build_dataset

    ds = build_dataset(DataConfig(), "train", train=False)
    paths = []
    for i in range(len(ds)):
        rgb, mask, label = ds.read(i)
        classes = np.flatnonzero(np.asarray(label) > 0)
        if classes.size == 0 or not np.isin(classes + 1, mask).any():
            continue
        h, w = max(1, round(rgb.shape[0] * scale)), max(1, round(rgb.shape[1] * scale))
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8)).resize((w, h), Image.NEAREST))
        cams = []
        for c in classes:
            blob = Image.fromarray(((small == c + 1) * 255).astype(np.uint8))
            blob = blob.filter(ImageFilter.GaussianBlur(6 * scale + 1))
            m = np.asarray(blob, np.float32)
            cams.append(m / (m.max() + 1e-5))
        path = out / f"{ds.ids[i]}.npz"
        np.savez(path, rgb=np.ascontiguousarray(rgb, np.uint8), cams=np.stack(cams).astype(np.float32),
                 classes=classes.astype(np.int64))
        paths.append(str(path))
        if len(paths) == count:
            break
    return paths


def proc_cpu(pids: list[int]) -> float:
    """Summed user + system CPU seconds of the processes (from /proc; a vanished pid counts 0)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / tick


def ray_system_pids(session_name: str) -> list[int]:
    """raylet, GCS, agents, monitors of this Ray instance (their command line names the session);
    worker processes (renamed ``ray::…``) are left out."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if session_name in cmd and not cmd.startswith("ray::"):
            pids.append(int(d.name))
    return pids


def pool_context():
    """forkserver, its server started (with the CRF modules loaded) before Ray: a plain fork
    of the driver would copy Ray's threads and signal handlers into the pool workers."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "cpal_ray.inference.pseudo"])
    return ctx


def _renice(niceness: int) -> None:
    os.nice(max(0, niceness - os.nice(0)))


def run_pool(ctx, paths: list[str], workers: int, niceness: int) -> Run:
    t0 = time.time()
    with ctx.Pool(workers, initializer=_renice, initargs=(niceness,)) as pool:
        rows = list(pool.imap_unordered(label_file, paths, chunksize=1))
    assert len(rows) == len(paths)
    return Run(t0, time.time(), rows, workers)


def run_ray(paths: list[str], workers: int) -> Run:
    import ray
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    ds = ds.map_batches(Labeler, compute=ActorPoolStrategy(size=workers), num_cpus=0.5, batch_size=1)
    rows = [{k: b[k][i] for k in FIELDS} for b in ds.iter_batches(batch_size=None) for i in range(len(b["path"]))]
    assert len(rows) == len(paths)
    return Run(t0, time.time(), rows, workers)


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--images", type=int, default=10, help="voc-mini photos per run")
    p.add_argument("--pool-nice", type=int, default=15,
                   help="niceness of the Pool workers; 15 = Ray's own worker niceness (RAY_worker_niceness), "
                        "so both compete for the shared cores on the same footing")
    p.add_argument("--scale", type=float, default=0.5, help="photo resize factor before the CRF")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.scale = 4, 0.25
    reps = args.reps or (1 if args.quick else 3)
    C.header("CRF pseudo-labels: Ray Data vs multiprocessing.Pool")
    import ray

    with tempfile.TemporaryDirectory(prefix="bench-crf-") as tmp:
        paths = prepare_images(Path(tmp), args.images, args.scale)
        sizes = [np.load(pth)["rgb"].shape[:2] for pth in paths]
        c0 = time.process_time()
        serial = [label_file(pth)["seconds"] for pth in paths[:2]]
        cpu_per_image = (time.process_time() - c0) / len(serial)
        print(f"setting: {len(paths)} voc-mini photos x{args.scale:g} (median {int(np.median([s[0] for s in sizes]))}x"
              f"{int(np.median([s[1] for s in sizes]))} px), IRN pseudo-label (2 DenseCRFs, 10 iterations); "
              f"one image in this process: {np.median(serial):.2f} s wall, {cpu_per_image:.2f} s CPU; {reps} reps")
        ctx = pool_context()
        run_pool(ctx, paths[:2], 2, args.pool_nice)  # starts the fork server before Ray
        if ray.is_initialized():
            ray.shutdown()
        info = ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="cpal-ray",
                        log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": f"{C.REPO}:{C.REPO / 'bench'}"}})
        system = ray_system_pids(Path(info.address_info["session_dir"]).name)
        try:
            ray.data.DataContext.get_current().enable_progress_bars = False
            run_ray(paths[:2], 2)  # warm-up: first Ray Data run (planner, worker processes, imports)
            runs: dict[str, list[Run]] = {k: [] for k in ("pool-1", "pool-2", "ray-1", "ray-2")}

            def variant(name):
                workers = int(name[-1])

                def go():
                    c0, s0 = time.process_time(), proc_cpu(system)
                    if name.startswith("pool"):
                        run = run_pool(ctx, paths, workers, args.pool_nice)
                    else:
                        run = run_ray(paths, workers)
                    run.overhead_cpu = time.process_time() - c0 + proc_cpu(system) - s0
                    runs[name].append(run)
                    return run.total
                return go

            C.interleave({k: variant(k) for k in runs}, reps=reps, warmup=0)
        finally:
            ray.shutdown()
    n = len(paths)
    steady = {k: [r.steady for r in v] for k, v in runs.items()}
    C.print_table(["variant", "end-to-end s", "min-max s", "first image after s", "images/s end-to-end",
                   "images/s steady", "CPU s/image", "wall s/image", "driver+Ray CPU s"],
                  [[k, C.median([r.total for r in v]), C.spread([r.total for r in v]), C.median([r.first for r in v]),
                    n / C.median([r.total for r in v]), C.median(steady[k]), C.median([r.cpu_per_image for r in v]),
                    C.median([r.wall_per_image for r in v]), C.median([r.overhead_cpu for r in v])]
                   for k, v in runs.items()])
    print(f"driver+Ray CPU = CPU seconds of this driver and of Ray's own processes ({len(system)}: raylet, GCS, "
          f"agents) during a run; the CRF work itself runs in the workers")
    e2e = {k: [r.total for r in v] for k, v in runs.items()}
    print(f"end to end ({n} images): ray-2/pool-2 {C.paired_ratio(e2e['pool-2'], e2e['ray-2']):.2f}x, "
          f"2w/1w pool {C.paired_ratio(e2e['pool-1'], e2e['pool-2']):.2f}x, "
          f"ray {C.paired_ratio(e2e['ray-1'], e2e['ray-2']):.2f}x")
    r_pool_scale = C.paired_ratio(steady["pool-2"], steady["pool-1"])
    r_ray_scale = C.paired_ratio(steady["ray-2"], steady["ray-1"])
    r_ray_pool = C.paired_ratio(steady["ray-2"], steady["pool-2"])
    print(f"steady state: 2w/1w pool {r_pool_scale:.2f}x, ray {r_ray_scale:.2f}x (target >= 1.8x); "
          f"ray-1/pool-1 {C.paired_ratio(steady['ray-1'], steady['pool-1']):.2f}x")
    print(C.ratio_line("ray_2w/ray_1w (steady images/s)", r_ray_scale, ">=", 1.8))
    print(C.ratio_line("raydata/pool (2 workers, steady images/s)", r_ray_pool, ">=", 0.9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
