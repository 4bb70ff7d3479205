"""Per-epoch k-means of the bank (20 classes x 1000 x D=128) vs an epoch; faiss inertia vs a reference.

    python bench/bench_kmeans.py [--quick] [--gpu-tflops 10]

Targets: the clustering <= 1 % of an epoch of the paper's setting; its inertia within 1 % of
a many-restart reference on the same data.

Measured here:
- ``PrototypeBank.cluster()`` (faiss, spherical, N_p = 50, 20 iterations, one run per class)
  on a bank filled with clustered unit vectors (bank-like data), several times, wall and CPU.
- Inertia (sum of squared distances to the nearest unit centroid = the spherical k-means
  objective) of those centroids vs a reference: per class the best of faiss k-means++ with
  10 restarts x 50 iterations and a numpy spherical k-means++ with 10 restarts x 50 iterations.
  Two faiss settings the bank could use instead are scored on the same data.
- Cross-check in the Euclidean setting: ``kmeans(spherical=False)`` vs sklearn
  ``KMeans(n_init=10)`` on a few classes.
- A ResNet-50 OS16 CPAL training step (random weights) on this CPU at a small size, and the
  FLOPs of that step and of the paper's per-GPU step (512 px, batch 2), counted on the meta
  device.
Estimated (stated, not measured):
- CPU epoch = 661 steps x measured step x FLOP ratio (512 px batch 2 / measured size).
- GPU epoch = 661 steps x FLOPs(512 px, batch 2) / ``--gpu-tflops`` (effective fp32 TFLOP/s
  per GPU; 10 = a V100-class GPU at ~65 % of peak). Only compute: no all-reduce, no data wait,
  so the epoch is underestimated and the k-means share overestimated (the strict reading).
"""
from __future__ import annotations

import time

import numpy as np

import _common as C

NUM_CLASSES, CAPACITY, DIM, CLUSTERS = 20, 1000, 128, 50


# ----------------------------------------------------------------------------- references


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum over rows of the squared distance to the nearest centroid. x (M, D), centroids (K, D)."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None]
    return float(np.maximum(d.min(1), 0.0).sum())


def numpy_spherical_kmeans(x: np.ndarray, k: int, n_init: int = 10, niter: int = 50, seed: int = 0) -> np.ndarray:
    """Reference spherical k-means: k-means++ seeding (D^2 = 2 - 2 cos), Lloyd with
    re-normalised means, ``n_init`` restarts, the best objective kept. x (M, D) unit rows."""
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    best, best_obj = None, np.inf
    for _ in range(n_init):
        cent = [x[rng.integers(len(x))]]
        d2 = np.maximum(2.0 - 2.0 * x @ cent[0], 0.0)
        for _ in range(1, k):
            p = d2 / d2.sum() if d2.sum() > 0 else None
            cent.append(x[rng.choice(len(x), p=p)])
            d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * x @ cent[-1], 0.0))
        c = np.stack(cent)
        for _ in range(niter):
            assign = (x @ c.T).argmax(1)
            new = np.zeros_like(c)
            np.add.at(new, assign, x)
            norms = np.linalg.norm(new, axis=1)
            empty = norms == 0
            new[~empty] /= norms[~empty, None]
            new[empty] = c[empty]  # an empty cluster keeps its centroid
            if np.allclose(new, c):
                c = new
                break
            c = new
        obj = inertia(x, c)
        if obj < best_obj:
            best, best_obj = c, obj
    return best.astype(np.float32)


def faiss_kmeans(x: np.ndarray, k: int, seed: int, **params) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, seed=seed, spherical=True, min_points_per_centroid=1,
                      max_points_per_centroid=1_000_000, verbose=False, **params)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


# --------------------------------------------------------------------------- step estimate


def step_flops(size: int, batch: int) -> float:
    """FLOPs of one ResNet-50 OS16 CAMNet forward + backward (counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cpal_ray.config import ModelConfig
    from cpal_ray.models import build_model

    model = build_model(ModelConfig(backbone="resnet50", pretrained=False), NUM_CLASSES).to("meta")
    x = torch.randn(batch, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as fc:
        out = model(x)
        (out["logits"].sum() + out["z"].sum()).backward()
    return float(fc.get_total_flops())


def measured_resnet_step(size: int, reps: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of a ResNet-50 CPAL step, batch 1, on this CPU."""
    import bench_cpal_step as S

    _, cpal, _ = S.build("resnet50", 1, size, "cpu")
    walls = [cpal.step() for _ in range(reps + 1)][1:]
    return C.median(walls), C.median(cpal.cpu_seconds[1:])


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--gpu-tflops", type=float, default=10.0,
                   help="assumed effective fp32 TFLOP/s per GPU for the paper-setting epoch estimate")
    p.add_argument("--step-size", type=int, default=320, help="side of the measured ResNet-50 CPU step (batch 1)")
    args = p.parse_args(argv)
    reps = args.reps or (2 if args.quick else 5)
    quality_classes = 3 if args.quick else NUM_CLASSES
    sk_classes = 1 if args.quick else 4
    if args.quick:
        args.step_size = 128
    threads = C.set_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    clock = C.resolve_clock(args.clock, "cpu", threads)
    C.header("per-epoch k-means vs an epoch; faiss inertia vs a many-restart reference")

    from cpal_ray.cpal import PrototypeBank, kmeans

    data = C.clustered_unit_vectors(NUM_CLASSES, CAPACITY, DIM, seed=0)
    bank = PrototypeBank(NUM_CLASSES, DIM, capacity=CAPACITY, num_clusters=CLUSTERS, spherical=True, kmeans_iters=20,
                         seed=1234, prefer_gpu=True)
    for c in range(NUM_CLASSES):
        bank.push(("fill", c), np.full(CAPACITY, c), data[c])
    walls, cpus = [], []
    for r in range(reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        bank.cluster(f"rep{r}")
        if r:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    km_s = C.median(cpus) if clock == "cpu" else C.median(walls)
    print(f"bank.cluster(): {NUM_CLASSES} classes x {CAPACITY} x D={DIM} -> N_p={CLUSTERS}, faiss on "
          f"{bank.last_cluster_device}, {threads} thread(s): wall median {C.median(walls):.3f} s "
          f"({C.spread(walls)}), CPU median {C.median(cpus):.3f} s")

    # ---- quality
    import faiss as _f

    kpp = _f.ClusteringInitMethod_KMEANS_PLUS_PLUS
    variants = {
        "bank.cluster (k-means++, best of 5)": lambda x, c: bank.context.prototypes[c].numpy(),
        "faiss k-means++, 1 run": lambda x, c: faiss_kmeans(x, CLUSTERS, 1234 + c, niter=20, init_method=kpp),
        "faiss k-means++, nredo=3": lambda x, c: faiss_kmeans(x, CLUSTERS, 1234 + c, niter=20, nredo=3,
                                                             init_method=kpp),
        "faiss k-means++, nredo=10": lambda x, c: faiss_kmeans(x, CLUSTERS, 1234 + c, niter=20, nredo=10,
                                                              init_method=kpp),
        "faiss random init, nredo=10": lambda x, c: faiss_kmeans(x, CLUSTERS, 1234 + c, niter=20, nredo=10),
    }
    ref_total, totals, secs = 0.0, {k: 0.0 for k in variants}, {k: 0.0 for k in variants}
    worst = 0.0
    for c in range(quality_classes):
        x = data[c]
        ref = min(inertia(x, faiss_kmeans(x, CLUSTERS, 99 + c, niter=50, nredo=10, init_method=kpp)),
                  inertia(x, numpy_spherical_kmeans(x, CLUSTERS, n_init=10, niter=50, seed=c)))
        ref_total += ref
        for name, fn in variants.items():
            c0 = time.process_time()
            cent = fn(x, c)
            secs[name] += time.process_time() - c0
            val = inertia(x, cent)
            totals[name] += val
            if name.startswith("bank"):
                worst = max(worst, val / ref)
    rows = [[name, totals[name], 100.0 * (totals[name] / ref_total - 1.0),
             "(timed above)" if name.startswith("bank") else f"{secs[name] * NUM_CLASSES / quality_classes:.3f}"]
            for name in variants]
    rows.append(["reference (best of 10x k-means++ faiss / numpy)", ref_total, 0.0, "-"])
    print(f"inertia over {quality_classes} classes (spherical objective, unit centroids):")
    C.print_table(["clustering", "inertia", "% above ref", "CPU s / 20 classes"], rows)
    print(f"worst single class of bank.cluster: {100.0 * (worst - 1.0):.1f} % above its reference")

    # ---- Euclidean cross-check with sklearn
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    eu_ours = eu_sk = 0.0
    with threadpool_limits(limits=max(threads, 1)):
        for c in range(sk_classes):
            x = data[c]
            cent, _ = kmeans(x, CLUSTERS, niter=20, seed=1234 + c, spherical=False, prefer_gpu=False)
            eu_ours += inertia(x, cent)
            eu_sk += KMeans(CLUSTERS, n_init=10, random_state=c).fit(x).inertia_
    print(f"Euclidean cross-check on {sk_classes} class(es): cpal kmeans(spherical=False) {eu_ours:.2f} vs sklearn "
          f"KMeans(n_init=10) {eu_sk:.2f}: {100.0 * (eu_ours / eu_sk - 1.0):+.1f} %")

    # ---- the epoch
    f_small, f_paper = step_flops(args.step_size, 1), step_flops(512, 2)
    step_wall, step_cpu = measured_resnet_step(args.step_size, 1 if args.quick else 2)
    step_here = step_cpu if clock == "cpu" else step_wall
    cpu_epoch = C.PAPER_STEPS_PER_EPOCH * step_here * f_paper / f_small
    gpu_step = f_paper / (args.gpu_tflops * 1e12)
    gpu_epoch = C.PAPER_STEPS_PER_EPOCH * gpu_step
    C.print_table(["epoch of the paper setting (661 steps, ResNet-50 OS16 512 px, batch 2/GPU)", "step s", "epoch s",
                   "k-means % of epoch"],
                  [[f"measured here: {args.step_size} px batch 1 = {step_here:.2f} s ({clock}), x FLOP ratio "
                    f"{f_paper / f_small:.1f} (estimate)", step_here * f_paper / f_small, cpu_epoch,
                    100.0 * km_s / cpu_epoch],
                   [f"GPU estimate: {f_paper / 1e9:.0f} GFLOP/step at {args.gpu_tflops:g} TFLOP/s (stated assumption)",
                    gpu_step, gpu_epoch, 100.0 * km_s / gpu_epoch]])
    print(C.ratio_line("kmeans/epoch", 100.0 * km_s / gpu_epoch, "<=", 1.0, unit=" %"))
    print(C.ratio_line("inertia bank.cluster/reference", totals[next(iter(variants))] / ref_total, "<=", 1.01))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
