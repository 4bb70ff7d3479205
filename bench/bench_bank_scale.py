"""The prototype bank at cluster scale: W simulated workers against S bank shards, batched pushes, k-means, broadcast.

    python bench/bench_bank_scale.py [--quick] [--workers 8,32,64,128,256] [--seconds 6] [--designs 4x16,1x64]

Starts its own local Ray (``address="local"``, shut down at the end). Three measurements, each
side by side for today's design (one actor, a call per step, the context returned by each call)
and the ``--designs`` (S class shards, a call per n steps per shard, the context broadcast
through the object store):

1. Push load. W simulated workers (coroutines in ``--generators`` async Ray actors; no model)
   each take a step every ``--step-s`` seconds (the paper's per-GPU step, 0.04 s, as in
   bench_bank_traffic.py) or 4x faster, and push M = 3 instance prototypes of D floats per step
   (local batch 2, about 1.5 per image), keyed (epoch, step, rank), through the client's own
   routing (``cpal_ray.cpal.shards.route_pushes``) to the real ``BankActor``s, at most 4 sends
   in flight per worker as ``BankClient`` does. Per setting: offered and absorbed steps/s (steps
   that started within the window), push latency (submission to completion) p50/p99, pending
   calls at the start and end of the window (backlog growth), the busiest bank actor's CPU
   share and its CPU per call (process time, Ray's threads included), the send stall (how long a
   step waited for an in-flight slot: what a trainer would feel) and the step lag (how late
   steps started). The lag grows when the bank back-pressures (the stall shows it) or when this
   2-core machine cannot run W simulated workers (no stall, bank CPU low): read them together.
2. The epoch-end k-means: ``PrototypeBank.cluster`` at VOC (20 classes) and COCO (80) scale,
   banks of 1000 and 5000 per class, D = 128 / 256, faiss per class (the bank's code; on the
   CPU with --threads threads, on a GPU when faiss sees one) timed per class. S shards cluster
   in parallel when each has its own core (``dist.bank_cpus`` >= 1; with the default 0 they may
   share one), so their time is the largest per-shard sum: derived from the per-class times,
   not measured in parallel. Beside it, one batched torch call over all classes (spherical
   Lloyd, k-means++ seeding, the same iterations and restarts), time and inertia vs faiss.
3. The context fetch at the end of an epoch: W workers each get the N x N_p x D context, by
   one actor call each returning it vs ``context_ref`` (one ``ray.put``, every worker reads
   the same object). Bytes per worker and the time until all W hold it. All W readers are on
   this one node (two processes), so no cross-node transfer is measured: a lower bound.

The epoch-end barrier (k-means + fetch) is compared with a GPU epoch estimate: steps per epoch
of the paper's global batch 16 (VOC 10582 / 16, COCO 82081 / 16) x --step-s.
"""
from __future__ import annotations

import asyncio
import os
import time

import numpy as np

import _common as C

VOC_IMAGES, COCO_IMAGES = 10582, 82081
PROTOS_PER_STEP = 3
IN_FLIGHT = 4


def start_ray(cpus: int):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, namespace="cpal-ray", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(C.REPO)}})
    return ray


def bank_config(num_classes_dataset: str, dim: int, shards: int, capacity: int = 1000):
    from cpal_ray.config import Config

    return Config().replace(**{"data.dataset": num_classes_dataset, "model.proj_dim": dim, "model.backbone": "tiny",
                               "model.pretrained": False, "cpal.bank_size": capacity, "cpal.bank_shards": shards})


class LoadGen:
    """Simulated workers as coroutines of one async actor (source of pushes and context reads)."""

    async def pushes(self, names: list[str], num_classes: int, ranks: range, step_s: float, push_every: int,
                     dim: int, seconds: float, seed: int) -> dict:
        import ray

        from cpal_ray.cpal.bank import pack_pushes
        from cpal_ray.cpal.shards import route_pushes, shard_classes
        from cpal_ray.distributed.runtime import NAMESPACE

        actors = [ray.get_actor(n, namespace=NAMESPACE) for n in names]
        groups = shard_classes(num_classes, len(actors))
        rng = np.random.default_rng(seed)
        protos = rng.standard_normal((64, PROTOS_PER_STEP, dim)).astype(np.float32)
        lat, lag, stall, steps = [], [], [], [0]
        pending = [0]
        samples = []
        t_start = time.perf_counter() + 0.2
        t_end = t_start + seconds

        async def call(actor, part):
            t0 = time.perf_counter()
            pending[0] += 1
            try:
                await actor.push_batch.remote(*pack_pushes(part))
            finally:
                pending[0] -= 1
            lat.append(time.perf_counter() - t0)

        async def worker(rank: int):
            my = np.random.default_rng(seed * 100003 + rank)
            buffer, inflight, step = [], set(), 0
            t_next = t_start + my.uniform(0, step_s)
            while t_next < t_end and time.perf_counter() < t_end:  # steps that start within the window
                await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
                lag.append(time.perf_counter() - t_next)
                cls = my.integers(0, num_classes, PROTOS_PER_STEP)
                buffer.append(((0, step, rank), cls, protos[step % 64]))
                step += 1
                steps[0] += 1
                if len(buffer) >= push_every:
                    parts = [buffer] if len(actors) == 1 else route_pushes(buffer, groups, num_classes)
                    buffer = []
                    t_wait = time.perf_counter()
                    while len(inflight) >= IN_FLIGHT * len(actors):  # the client's bound: the step waits
                        _, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    stall.append(time.perf_counter() - t_wait)
                    for actor, part in zip(actors, parts):
                        inflight.add(asyncio.ensure_future(call(actor, part)))
                t_next = max(t_next + step_s, time.perf_counter() - step_s)  # a late worker does not burst
            if inflight:
                await asyncio.wait(inflight)

        async def sampler():
            while time.perf_counter() < t_end:
                samples.append((time.perf_counter() - t_start, pending[0]))
                await asyncio.sleep(0.1)

        tasks = [asyncio.ensure_future(worker(r)) for r in ranks] + [asyncio.ensure_future(sampler())]
        await asyncio.gather(*tasks)
        return {"lat": lat, "lag": lag, "stall": stall, "steps": steps[0], "samples": samples}

    async def fetch(self, names: list[str], tag: str, n: int, broadcast: bool) -> list[float]:
        """n workers each get the context; seconds from the start until each one holds it."""
        import ray

        from cpal_ray.distributed.runtime import NAMESPACE

        actors = [ray.get_actor(x, namespace=NAMESPACE) for x in names]
        t0 = time.perf_counter()

        async def one():
            if broadcast:
                refs = await asyncio.gather(*(a.context_ref.remote(tag) for a in actors))
                parts = await asyncio.gather(*(r[0] for r in refs))
            else:
                parts = await asyncio.gather(*(a.cluster.remote(tag) for a in actors))
            assert all(p is not None for p in parts)
            return time.perf_counter() - t0

        return list(await asyncio.gather(*(one() for _ in range(n))))


def percentile(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def run_load(ray, gens, cfg, names, workers: int, step_s: float, push_every: int, dim: int, seconds: float) -> dict:
    from cpal_ray.distributed.bank_actor import create_bank_actors, remove_bank_actor

    actors = create_bank_actors(cfg, names)
    try:
        cpu0 = ray.get([a.cpu_seconds.remote() for a in actors])
        t0 = time.perf_counter()
        per = [range(g, workers, len(gens)) for g in range(len(gens))]
        outs = ray.get([g.pushes.remote(names, cfg.bank_classes, r, step_s, push_every, dim, seconds, i)
                        for i, (g, r) in enumerate(zip(gens, per))])
        wall = time.perf_counter() - t0
        cpu1 = ray.get([a.cpu_seconds.remote() for a in actors])
    finally:
        for n in names:
            remove_bank_actor(n)
    lat = [x for o in outs for x in o["lat"]]
    lag = [x for o in outs for x in o["lag"]]
    stall = [x for o in outs for x in o["stall"]]
    pend = {}
    for o in outs:
        for t, p in o["samples"]:
            pend.setdefault(round(t, 1), 0)
            pend[round(t, 1)] += p
    series = [pend[k] for k in sorted(pend)]
    third = max(1, len(series) // 3)
    used = [b - a for a, b in zip(cpu0, cpu1)]
    share = max(u / wall for u in used)
    return {"offered": workers / step_s, "absorbed": sum(o["steps"] for o in outs) / seconds,
            "calls_s": len(lat) / seconds, "p50": 1e3 * percentile(lat, 50), "p99": 1e3 * percentile(lat, 99),
            "pending_first": float(np.mean(series[:third])) if series else 0.0,
            "pending_last": float(np.mean(series[-third:])) if series else 0.0,
            "bank_cpu": 100.0 * share, "lag_p99": 1e3 * percentile(lag, 99),
            "ms_per_call": 1e3 * sum(used) / max(len(lat), 1), "stall_p99": 1e3 * percentile(stall, 99),
            }


# ------------------------------------------------------------------------------- k-means


def faiss_per_class(x: np.ndarray, clusters: int, iters: int, redo: int, threads: int) -> list[float]:
    """Seconds of the bank's own k-means (``cpal.kmeans.kmeans``) for each class of x (C, M, D)."""
    from cpal_ray.cpal.kmeans import kmeans

    from cpal_ray.cpal.kmeans import import_faiss

    import_faiss().omp_set_num_threads(threads)
    kmeans(x[0], clusters, niter=2, seed=0, spherical=True, nredo=1)  # faiss's first call pays its start-up
    out = []
    for c in range(len(x)):
        t0 = time.perf_counter()
        kmeans(x[c], clusters, niter=iters, seed=c, spherical=True, prefer_gpu=True, nredo=redo)
        out.append(time.perf_counter() - t0)
    return out


def torch_batched_kmeans(x, clusters: int, iters: int, redo: int, seed: int = 0):
    """Spherical k-means of every class at once: x (C, M, D) unit rows -> (C, K, D) centroids.

    k-means++ seeding and Lloyd steps batched over classes and restarts (C * redo problems in one
    tensor); per class the restart of the best objective is kept."""
    import torch

    g = torch.Generator(device=x.device).manual_seed(seed)
    c_, m, d = x.shape
    xs = x.repeat_interleave(redo, 0)  # (C*R, M, D)
    b = xs.shape[0]
    rows = torch.arange(b, device=x.device)
    first = torch.randint(0, m, (b,), generator=g, device=x.device)
    cent = [xs[rows, first]]
    d2 = (2 - 2 * torch.einsum("bmd,bd->bm", xs, cent[0])).clamp_min(0)
    for _ in range(1, clusters):
        pick = torch.multinomial(d2 + 1e-12, 1, generator=g).squeeze(1)
        cent.append(xs[rows, pick])
        d2 = torch.minimum(d2, (2 - 2 * torch.einsum("bmd,bd->bm", xs, cent[-1])).clamp_min(0))
    cent = torch.stack(cent, 1)  # (B, K, D)
    for _ in range(iters):
        assign = torch.bmm(xs, cent.transpose(1, 2)).argmax(2)  # (B, M)
        new = torch.zeros_like(cent).scatter_add_(1, assign[..., None].expand(-1, -1, d), xs)
        norm = new.norm(dim=2, keepdim=True)
        cent = torch.where(norm > 0, new / norm.clamp_min(1e-12), cent)
    sims = torch.bmm(xs, cent.transpose(1, 2)).max(2).values
    obj = (2 - 2 * sims).clamp_min(0).sum(1).view(c_, redo)
    best = obj.argmin(1)
    return cent.view(c_, redo, clusters, d)[torch.arange(c_), best], obj.min(1).values


def inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    sims = (x @ centroids.T).max(1)
    return float(np.maximum(2 - 2 * sims, 0).sum())


def kmeans_rows(settings, clusters: int, iters: int, redo: int, shards: list[int], threads: int) -> list[list]:
    import torch

    from cpal_ray.cpal.kmeans import kmeans
    from cpal_ray.cpal.shards import shard_classes

    rows = []
    for name, classes, cap, dim in settings:
        x = C.clustered_unit_vectors(classes, cap, dim, seed=3)
        per_class = faiss_per_class(x, clusters, iters, redo, threads)
        seq = sum(per_class)
        sharded = [max(sum(per_class[c] for c in g) for g in shard_classes(classes, sh)) for sh in shards]
        t0 = time.perf_counter()
        cents, _ = torch_batched_kmeans(torch.from_numpy(x), clusters, iters, redo)
        batched = time.perf_counter() - t0
        faiss_in = sum(inertia(x[c], kmeans(x[c], clusters, niter=iters, seed=c, spherical=True, nredo=redo)[0])
                       for c in range(min(classes, 4)))
        torch_in = sum(inertia(x[c], cents[c].numpy()) for c in range(min(classes, 4)))
        rows.append([name, classes, cap, dim, seq, *sharded, batched, torch_in / faiss_in])
    return rows


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--workers", default="8,32,64,128,256", help="W values, comma separated")
    p.add_argument("--dims", default="128,256", help="D values of the push load")
    p.add_argument("--seconds", type=float, default=6.0, help="load window per setting")
    p.add_argument("--step-s", type=float, default=0.04, help="the paper's per-GPU step (s), as bench_bank_traffic")
    p.add_argument("--designs", default="4x16,1x64",
                   help="designs compared with today's (S=1, n=1), as SxN (S shards, a call per N steps); the last "
                        "one is the chosen design of the ratio line; the largest S is the sharded one of parts 2-3")
    p.add_argument("--generators", type=int, default=2, help="async actors simulating the workers")
    p.add_argument("--push-only", action="store_true", help="part 1 only (no fetch, no k-means)")
    p.add_argument("--cpus", type=int, default=0, help="CPUs given to the local Ray (0 = this machine's cores)")
    args = p.parse_args(argv)
    if args.quick:
        args.workers, args.dims, args.seconds = "8,32", "128", 1.5
    workers = [int(w) for w in args.workers.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    C.set_threads(args.threads)
    C.header("the prototype bank at cluster scale")
    designs = {"today (S=1, n=1)": (1, 1)}
    for sn in args.designs.split(","):  # the last one is the chosen design of the ratio line
        s_, n_ = (int(v) for v in sn.lower().split("x"))
        designs[f"S={s_}, n={n_}"] = (s_, n_)
    args.shards = max(s_ for s_, _ in designs.values())
    ray = start_ray(args.cpus or os.cpu_count() or 2)
    from cpal_ray.distributed.bank_actor import bank_actor_names

    try:
        gens = [ray.remote(LoadGen).options(num_cpus=0, max_concurrency=10_000).remote() for _ in range(args.generators)]
        print(f"\n1. push load: {PROTOS_PER_STEP} prototypes per step, a step every {args.step_s} s per worker (1x) "
              f"or {args.step_s / 4} s (4x), {args.seconds} s per setting, {args.generators} generator actors")
        rows, p99_at = [], {}
        for dim in dims:
            for mult in (1, 4):
                for w in workers:
                    for label, (s, n) in designs.items():
                        cfg = bank_config("voc", dim, s)
                        names = bank_actor_names(f"scale-{os.getpid()}-{w}-{dim}-{mult}-{s}", s)
                        r = run_load(ray, gens, cfg, names, w, args.step_s / mult, n, dim, args.seconds)
                        rows.append([label, dim, f"{mult}x", w, r["offered"], r["absorbed"], r["calls_s"], r["p50"],
                                     r["p99"], f"{r['pending_first']:.0f}->{r['pending_last']:.0f}", r["bank_cpu"],
                                     r["ms_per_call"], r["stall_p99"], r["lag_p99"]])
                        p99_at[(label, dim, mult, w)] = r
                        print("  " + " | ".join(C._fmt(c) for c in rows[-1]), flush=True)
        C.print_table(["design", "D", "rate", "W", "offered steps/s", "absorbed steps/s", "calls/s", "p50 ms",
                       "p99 ms", "pending first->last third", "bank CPU %", "bank CPU ms/call", "send stall p99 ms", "step lag p99 ms"], rows)
        # A single actor's ceiling: calls/s it can absorb = 1 / its CPU per call (one core, one thread).
        today = [r for (lbl, _, _, _), r in p99_at.items() if lbl == list(designs)[0] and r["calls_s"] > 0]
        ms_call = C.median([r["ms_per_call"] for r in today])
        print(f"one bank actor: {ms_call:.3f} ms of CPU per push call (median over the settings) -> at most "
              f"{1e3 / ms_call:.0f} calls/s; at a call per step and {1 / args.step_s:.0f} steps/s per worker it "
              f"saturates at W = {1e3 / ms_call * args.step_s:.0f} workers (4x rate: {1e3 / ms_call * args.step_s / 4:.0f})")

        if args.push_only:
            chosen = list(designs)[-1]
            worst = max(p99_at[(chosen, d, 1, max(workers))]["p99"] for d in dims)
            print(C.ratio_line(f"push_p99_ms_at_{max(workers)}_workers_chosen_design", worst, "<=", 50.0))
            return 0
        print("\n3. context fetch at the end of an epoch (VOC 20 x 50 x 128 and COCO 80 x 50 x 256 float32)")
        from cpal_ray.distributed.bank_actor import create_bank_actors, remove_bank_actor

        fetch_rows, fetch_at = [], {}
        for dataset, dim in (("voc", 128), ("coco", 256)):
            for label, (s, _) in [(k, designs[k]) for k in dict.fromkeys([list(designs)[0], list(designs)[-1]])]:
                cfg = bank_config(dataset, dim, s, capacity=200)
                names = bank_actor_names(f"fetch-{os.getpid()}-{dataset}-{s}", s)
                actors = create_bank_actors(cfg, names)
                try:
                    fill = C.clustered_unit_vectors(cfg.bank_classes, 200, dim, seed=2)
                    from cpal_ray.cpal.shards import route_pushes, shard_classes

                    items = [(("fill", c), np.full(200, c), fill[c]) for c in range(cfg.bank_classes)]
                    parts = ([items] if s == 1 else route_pushes(items, shard_classes(cfg.bank_classes, s),
                                                                  cfg.bank_classes))
                    from cpal_ray.cpal.bank import pack_pushes

                    ray.get([a.push_batch.remote(*pack_pushes(pt)) for a, pt in zip(actors, parts)])
                    ray.get([a.cluster.remote("e1") for a in actors])
                    nbytes = cfg.bank_classes * cfg.cpal.num_clusters * dim * 4
                    for w in workers:
                        per = [w // len(gens) + (g < w % len(gens)) for g in range(len(gens))]
                        for broadcast in (False, True):
                            t0 = time.perf_counter()
                            ray.get([g.fetch.remote(names, "e1", k, broadcast) for g, k in zip(gens, per) if k])
                            dt = time.perf_counter() - t0
                            how = "broadcast (context_ref)" if broadcast else "actor call per worker"
                            fetch_rows.append([dataset, label, how, w, nbytes / 1e6, dt])
                            fetch_at[(dataset, label, broadcast, w)] = dt
                finally:
                    for n in names:
                        remove_bank_actor(n)
        C.print_table(["dataset", "design", "fetch", "W", "MB per worker", "s until all hold it"], fetch_rows)
    finally:
        ray.shutdown()

    print(f"\n2. epoch-end k-means (faiss per class, N_p=50, 20 iterations, 5 restarts, {max(1, args.threads)} thread(s); "
          "torch batched: one call)")
    settings = [("VOC", 20, 1000, 128)] if args.quick else [
        ("VOC", 20, 1000, 128), ("VOC", 20, 1000, 256), ("VOC", 20, 5000, 128), ("VOC", 20, 5000, 256),
        ("COCO", 80, 1000, 128), ("COCO", 80, 1000, 256), ("COCO", 80, 5000, 128), ("COCO", 80, 5000, 256)]
    k_shards = sorted({args.shards, 2 * args.shards})
    km = kmeans_rows(settings, 50, 20, 5, k_shards, max(1, args.threads))
    C.print_table(["dataset", "classes", "bank/class", "D", "faiss S=1 s",
                   *[f"faiss S={sh} s (derived)" for sh in k_shards], "torch batched s",
                   "batched/faiss inertia (4 classes)"], km)

    print("\nepoch-end barrier = k-means (largest shard) + fetch by W workers, vs a GPU epoch estimate "
          f"(global batch 16, {args.step_s} s per step)")
    w_max = max(workers)
    barrier_rows = []
    today, chosen = list(designs)[0], list(designs)[-1]
    for dataset, images, dim in (("VOC", VOC_IMAGES, 128), ("COCO", COCO_IMAGES, 256)):
        epoch = images // 16 * args.step_s
        for k_row in [r for r in km if r[0] == dataset and r[3] == dim]:
            for col, sh in enumerate([1, *k_shards]):
                label = today if sh == 1 else f"S={sh}, broadcast"
                f_s = fetch_at[(dataset.lower(), today if sh == 1 else chosen, sh != 1, w_max)]
                k_s = k_row[4 + col]
                barrier_rows.append([dataset, k_row[2], label, k_s, f_s, epoch, 100.0 * (k_s + f_s) / epoch])
    C.print_table(["dataset", "bank/class", "design", "k-means s", f"fetch s (W={w_max})", "GPU epoch s",
                   "barrier %"], barrier_rows)
    worst = max(p99_at[(chosen, d, 1, w_max)]["p99"] for d in dims)
    print(C.ratio_line(f"push_p99_ms_at_{w_max}_workers_chosen_design", worst, "<=", 50.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
