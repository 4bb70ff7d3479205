"""Bank actor traffic per training step vs an in-process bank (target: <= 5 % of the step).

    python bench/bench_bank_traffic.py [--quick] [--backbone efficientnet_lite0] [--batch 4] [--size 256]

Starts its own local Ray (``address="local"``, 2 CPUs; shut down at the end) and the run's
``BankActor`` (``create_bank_actor``), filled to capacity and clustered once. Then real CPAL
training steps (``train_one_epoch``, one step per call, the demo's per-worker setting by
default) alternate between two banks:
- ray: ``BankClient`` (fire-and-forget pushes, ``dist.max_pushes_in_flight`` = 4 in flight);
- local: an in-process ``PrototypeBank``.
Measured on the worker side: the wall time of each ``bank.push`` call inside the step, and
(alternately, several times) the per-epoch context fetch: ``BankClient.cluster(tag)`` of a tag
already clustered = flush + barrier + round trip returning the N x N_p x D ``Context``; the
in-process equivalent for the local bank. The fetch is amortised over the paper's
10582 / 16 = 661 steps per epoch. Traffic per step = push + fetch / 661, as % of the measured step.
The k-means itself runs once per epoch on the actor, off the workers' path: bench_kmeans.py.
"""
from __future__ import annotations

import os
import time

import numpy as np

import _common as C

NUM_CLASSES, DIM = 20, 128


class TimedBank:
    """Forwards ``push`` to a bank (client or in-process) and records each call's wall seconds."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds: list[float] = []

    def push(self, key, class_ids, protos):
        t0 = time.perf_counter()
        out = self.inner.push(key, class_ids, protos)
        self.seconds.append(time.perf_counter() - t0)
        return out


def start_ray():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="cpal-ray", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(C.REPO)}})
    return ray


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0", help="tiny | efficientnet_lite0 | resnet50")
    p.add_argument("--batch", type=int, default=4, help="per-worker batch")
    p.add_argument("--size", type=int, default=256, help="square crop side (px)")
    p.add_argument("--gpu-step", type=float, default=0.04,
                   help="assumed per-GPU step seconds of the paper's setting (ResNet-50 OS16, 512 px, batch 2): "
                        "394 GFLOP at 10 TFLOP/s, compute only, as in bench_kmeans.py")
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.size = "tiny", 128
    reps = args.reps or (4 if args.quick else 8)
    threads = C.set_threads(args.threads)
    clock = C.resolve_clock(args.clock, "cpu", threads)
    C.header("bank actor traffic vs in-process bank")

    import bench_cpal_step as S
    from cpal_ray.cpal import PrototypeBank
    from cpal_ray.distributed.bank_actor import BankClient, create_bank_actor

    ray = start_ray()
    try:
        _, stepper, _ = S.build(args.backbone, args.batch, args.size, "cpu")
        cfg = stepper.cfg
        assert cfg.model.proj_dim == DIM, "the stepper's projection dim is the bank's D"
        actor = create_bank_actor(cfg, f"bench-bank-{os.getpid()}")
        fill = C.clustered_unit_vectors(NUM_CLASSES, cfg.cpal.bank_size, DIM, seed=1)
        ray.get([actor.push.remote(("fill", c), np.full(cfg.cpal.bank_size, c), fill[c]) for c in range(NUM_CLASSES)])
        ray.get(actor.cluster.remote("bench"))
        client = BankClient(actor, cfg.dist.max_pushes_in_flight)
        local = PrototypeBank.from_config(cfg, DIM, prefer_gpu=False)
        C.fill_bank(local, seed=1)
        local.cluster("bench")
        banks = {"ray": TimedBank(client), "local": TimedBank(local)}
        step_wall: dict[str, list[float]] = {"ray": [], "local": []}
        step_cpu: dict[str, list[float]] = {"ray": [], "local": []}

        def step_with(name):
            def run():
                stepper.hook.bank = banks[name]
                wall = stepper.step()
                step_wall[name].append(wall)
                step_cpu[name].append(stepper.cpu_seconds[-1])
                return wall
            return run

        def fetch_ray():
            t0 = time.perf_counter()
            client.cluster("bench")
            return time.perf_counter() - t0

        def fetch_local():
            t0 = time.perf_counter()
            local.cluster("bench")
            return time.perf_counter() - t0

        print(f"setting: {args.backbone} (pretrained={cfg.model.pretrained}), per-worker batch {args.batch}, "
              f"{args.size}x{args.size} px, cpu; bank 1000 x {NUM_CLASSES} classes, D={DIM}, N_p=50; "
              f"{reps} steps per bank, fetch amortised over {C.PAPER_STEPS_PER_EPOCH} steps/epoch")
        C.interleave({"ray": step_with("ray"), "local": step_with("local")}, reps=reps, warmup=1)
        fetch = C.interleave({"ray": fetch_ray, "local": fetch_local}, reps=reps, warmup=1)
        client.flush()
        # Upper bound: pushes back to back (no step between), so the in-flight bound waits on the actor.
        burst_n = 50 if args.quick else 200
        protos = fill[0, :7]
        t0 = time.perf_counter()
        for i in range(burst_n):
            client.push(("burst", i), np.zeros(7, dtype=np.int64), protos)
        client.flush()
        burst = (time.perf_counter() - t0) / burst_n
        push = {k: b.seconds[1:] for k, b in banks.items()}  # drop the warm-up step's push
        push_bytes = client.bytes_sent / max(client.pushes, 1)
        context = client.cluster("bench")
        fetch_bytes = context.prototypes.nbytes + context.counts.nbytes
        t0 = time.perf_counter()
        client.cluster("bench-new")  # a new tag: the actor runs the k-means (once per epoch in training)
        cluster_rpc = time.perf_counter() - t0
        stats = ray.get(actor.stats.remote())
    finally:
        ray.shutdown()

    step_s = C.median(step_cpu["local"] if clock == "cpu" else step_wall["local"])
    rows, share = [], {}
    for k in ("ray", "local"):
        per_step = C.median(push[k]) + C.median(fetch[k]) / C.PAPER_STEPS_PER_EPOCH
        share[k] = 100.0 * per_step / step_s
        rows.append([k, 1e3 * C.median(push[k]), C.spread([1e3 * x for x in push[k]]), 1e3 * C.median(fetch[k]),
                     1e3 * per_step, share[k]])
    C.print_table(["bank", "push ms (median)", "push ms min-max", "fetch ms", "per step ms", "% of step"], rows)
    print(f"training step ({clock} clock, median of the in-process-bank steps): {step_s:.3f} s; "
          f"wall medians ray {C.median(step_wall['ray']):.3f} s / local {C.median(step_wall['local']):.3f} s")
    print(f"bytes per step: push {push_bytes:.0f} B + fetch {fetch_bytes} B / {C.PAPER_STEPS_PER_EPOCH} = "
          f"{push_bytes + fetch_bytes / C.PAPER_STEPS_PER_EPOCH:.0f} B")
    print(f"back-to-back pushes (actor-bound upper bound, {burst_n} pushes): {1e3 * burst:.2f} ms each; "
          f"actor holds {stats['bank_keys']} keys")
    print(f"per-epoch clustering on the actor (new tag): {stats['cluster_seconds']:.3f} s k-means on "
          f"{stats['cluster_device']}, {cluster_rpc:.3f} s for the worker's call")
    ray_per_step = share["ray"] * step_s / 100.0
    print(f"ray push / in-process push = {C.median(push['ray']) / max(C.median(push['local']), 1e-9):.1f}x; "
          f"ray traffic vs an assumed {args.gpu_step:.2f} s GPU step: {100.0 * ray_per_step / args.gpu_step:.2f} %")
    print(C.ratio_line("bank_traffic/step", share["ray"], "<=", 5.0, unit=" %"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
