"""Data loading share of a training step (target <= 10 %): DataLoader with 0 and 2 workers.

    python bench/bench_data_loading.py [--quick] [--steps 5] [--workers 0,2]

The demo's setting (configs/voc_mini_cpu.yaml): voc-mini train photos, random long-side resize
256-352, flip, crop 256, per-worker batch 4 (global 8 over 2 workers: rank 0's
``GlobalBatchSampler`` shard), EfficientNet-Lite0 (shipped ImageNet weights) CPAL step with
context prototypes, via ``cpal_ray.engine.train_one_epoch`` — the real loop, which measures
the step itself. The loader is wrapped to time every ``next(batch)`` (the data wait).
Each run is a fresh epoch loader (workers are not persistent, as in training); runs alternate
between the worker counts. Share = data wait / (data wait + step), steady state (the first
batch, which pays the loader start-up, left out; its wait is shown separately, amortised it
is 1/661 of an epoch of the paper's setting). Wall time: a worker's loading overlaps the step.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch.utils.data import DataLoader

import _common as C


class TimedLoader:
    """Iterates a DataLoader and records the wall seconds each batch took to arrive."""

    def __init__(self, loader):
        self.loader = loader
        self.waits: list[float] = []

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.waits.append(time.perf_counter() - t0)
            yield batch


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--steps", type=int, default=5, help="training steps per run")
    p.add_argument("--workers", default="0,2", help="DataLoader worker counts to compare")
    p.add_argument("--headline-workers", type=int, default=-1,
                   help="worker count of the last line (-1 = the config's data.loader_workers)")
    p.add_argument("--config", default="configs/voc_mini_cpu.yaml")
    args = p.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    if args.quick:
        args.steps = 3
    C.set_threads(args.threads)
    C.header("data loading share of a training step")

    import bench_cpal_step as S
    from cpal_ray.config import load_config
    from cpal_ray.data import build_dataset
    from cpal_ray.engine import CPALHook, TrainState, build_optimizer, build_scheduler, train_one_epoch
    from cpal_ray.engine.sampler import GlobalBatchSampler
    from cpal_ray.models import build_model

    cfg = load_config(args.config, [])
    if args.quick:  # the tiny net and small crops: a smoke run
        cfg = cfg.replace(**{"model.backbone": "tiny", "model.pretrained": False, "data.resize_long": [128, 160],
                             "data.crop_size": 128})
    # The paper's bank (the demo's is smaller); a tiny learning rate keeps repeated steps finite
    # whatever the config's optimiser says (the cost of a step does not depend on it).
    cfg = dataclasses.replace(cfg, cpal=dataclasses.replace(cfg.cpal, bank_size=1000, num_clusters=50, top_k=20),
                              optim=dataclasses.replace(cfg.optim, lr=1e-5))
    workers = [int(w) for w in args.workers.split(",")]
    headline = cfg.data.loader_workers if args.headline_workers < 0 else args.headline_workers
    if headline not in workers:
        workers.append(headline)
    world = cfg.dist.num_workers
    dataset = build_dataset(cfg.data, "train", train=True)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes)
    bank, context = S.make_context(cfg, model.embed_dim)
    optimizer = build_optimizer(model, cfg.optim)
    state = TrainState(cfg, model, optimizer, build_scheduler(optimizer, 10**6, cfg.optim.poly_power), "cpu", rank=0,
                       world_size=1, steps_per_epoch=args.steps, extras={"context": context})
    hook = CPALHook(bank)  # the step's pushes, as in training
    local_batch = cfg.train.batch_size // world
    print(f"setting: {cfg.model.backbone} (pretrained={cfg.model.pretrained}), {len(dataset)} voc-mini train photos, "
          f"resize long {tuple(cfg.data.resize_long)}, crop {cfg.data.crop_size}, per-worker batch {local_batch} "
          f"(global {cfg.train.batch_size} / {world} workers), {args.steps} steps per run, {reps} reps, cpu")
    results: dict[str, dict[str, list[float]]] = {}
    epoch = [0]

    def run(nw: int):
        def go():
            sampler = GlobalBatchSampler(len(dataset), cfg.train.batch_size, world, 0, seed=0, max_steps=args.steps)
            sampler.set_epoch(epoch[0])
            dataset.set_epoch(epoch[0])
            loader = TimedLoader(DataLoader(dataset, batch_sampler=sampler, num_workers=nw))
            t0 = time.perf_counter()
            state.epoch = epoch[0]
            hook.before_epoch(state)
            stats = train_one_epoch(state, loader, [hook])
            total = time.perf_counter() - t0
            epoch[0] += 1
            r = results.setdefault(f"workers={nw}", {"first": [], "wait": [], "step": [], "share": []})
            steady_wait = sum(loader.waits[1:]) / max(len(loader.waits) - 1, 1)
            step = stats["step_seconds"] / max(stats["steps"], 1)
            r["first"].append(loader.waits[0])
            r["wait"].append(steady_wait)
            r["step"].append(step)
            r["share"].append(100.0 * steady_wait / (steady_wait + step))
            return total
        return go

    C.interleave({f"workers={nw}": run(nw) for nw in workers}, reps=reps, warmup=0)
    rows = []
    for name, r in results.items():
        both = [a + b for a, b in zip(r["wait"], r["step"])]
        rows.append([name, C.median(r["wait"]), C.median(r["step"]), C.median(both), C.median(r["share"]),
                     C.spread(r["share"]), C.median(r["first"])])
    C.print_table(["loader", "data wait s/step", "step s", "wait+step s", "data share %", "share min-max %",
                   "first batch s"], rows)
    share = C.median(results[f"workers={headline}"]["share"])
    print(C.ratio_line(f"data_wait/(data_wait+step) [num_workers={headline}]", share, "<=", 10.0, unit=" %"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
