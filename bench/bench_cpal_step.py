"""CPAL training step vs the plain CAM step: same backbone, batch and input (target <= 1.15x).

    python bench/bench_cpal_step.py [--quick] [--backbone efficientnet_lite0] [--batch 4] [--size 320]

Both steps are ``cpal_ray.engine.train_one_epoch`` over a one-batch loader (the real training
step: forward, losses, backward, SGD, poly schedule), so nothing is re-implemented here:
- CAM step: ``cpal.enabled=False`` (BCE only, no bank).
- CPAL step: ``cpal.enabled=True`` with context prototypes (N=20 classes x N_p=50 x D=128 from a
  filled bank, K=20): instance prototypes (Eq. 4), alignment, top-K, positiveness, PACAM, L_self
  (Eqs. 6-14), plus the push of the step's prototypes into an in-process ``PrototypeBank``.
Two model copies with the same initial weights, each with its own optimiser; the steps
alternate (CAM CPAL, CPAL CAM, ...) and the ratio is the median of the per-pair ratios.
``--profile`` adds a torch.profiler table of the CPAL step's operators.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch

import _common as C
from cpal_ray.config import Config
from cpal_ray.cpal import Context, PrototypeBank
from cpal_ray.engine import CPALHook, TrainState, build_optimizer, build_scheduler, train_one_epoch
from cpal_ray.models import build_model

NUM_CLASSES = 20


def make_config(backbone: str, batch: int, enabled: bool, lr: float = 1e-5) -> Config:
    """EfficientNet-Lite0 gets its shipped ImageNet weights: randomly initialised, its frozen
    BatchNorms shrink the features to ~1e-7, every normalised CAM stays below tau, no instance
    prototype exists and the CPAL step would silently skip PACAM and L_self. ResNet-50 and the
    tiny net keep random weights (none can be downloaded here; see ``build`` for their CAMs).
    The small learning rate keeps repeated steps on one batch finite; it does not change the cost."""
    cfg = Config()
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, backbone=backbone, pretrained=backbone == "efficientnet_lite0",
                                  weights="", proj_dim=128),
        cpal=dataclasses.replace(cfg.cpal, enabled=enabled),  # paper defaults: N_p 50, K 20, bank 1000, tau 0.1
        optim=dataclasses.replace(cfg.optim, lr=lr),
        train=dataclasses.replace(cfg.train, batch_size=batch, log_every=10**9),
    )


def make_context(cfg: Config, dim: int, seed: int = 0) -> tuple[PrototypeBank, Context]:
    """A bank filled to capacity (1000 per class) and its clustering (the epoch's context)."""
    bank = PrototypeBank.from_config(cfg, dim, prefer_gpu=False)
    C.fill_bank(bank, seed)
    return bank, bank.cluster("bench")


class Stepper:
    """One model + optimiser; ``step()`` runs one ``train_one_epoch`` step and returns its seconds."""

    def __init__(self, model, cfg: Config, batch: dict, device: str, bank=None, context=None):
        self.cfg, self.batch, self.device, self.context = cfg, batch, device, context
        opt = build_optimizer(model, cfg.optim)
        self.state = TrainState(cfg, model, opt, build_scheduler(opt, 10**6, cfg.optim.poly_power), device, rank=0,
                                world_size=1, steps_per_epoch=1, extras={"context": context})
        self.hook = CPALHook(bank)  # pushes and counts L_self each step, as in training (no clustering here)
        self.calls = 0
        self.last: dict = {}
        self.cpu_seconds: list[float] = []

    def step(self) -> float:
        """Wall seconds of one step; the process CPU seconds go to ``cpu_seconds``."""
        C.sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        # epoch = call number: every bank key (epoch, step, rank) is new, so every push stores.
        self.state.epoch = self.calls
        self.hook.before_epoch(self.state)
        self.last = train_one_epoch(self.state, [self.batch], [self.hook])
        self.last.update(self_images=int(self.hook.counts[0]), pushed=self.hook.pushed)
        C.sync(self.device)
        self.calls += 1
        self.cpu_seconds.append(time.process_time() - c0)
        return time.perf_counter() - t0


def build(backbone: str, batch: int, size: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    cam_cfg, cpal_cfg = make_config(backbone, batch, False), make_config(backbone, batch, True)
    model = build_model(cam_cfg.model, NUM_CLASSES)
    if not cam_cfg.model.pretrained:
        # Random weights: a class whose raw CAM is negative everywhere has no instance prototype,
        # and an image with such a class takes no part in L_self. Non-negative classifier weights
        # on the (post-ReLU, non-negative) features keep every positive class's CAM alive, so the
        # CPAL step does all of its work; the cost of a step does not depend on the weights' sign.
        with torch.no_grad():
            model.classifier.weight.abs_()
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    labels = torch.from_numpy(C.multilabel_batch(batch, NUM_CLASSES, seed))
    data = {"image": images, "label": labels}
    bank, context = make_context(cpal_cfg, model.embed_dim, seed)
    cam = Stepper(copy.deepcopy(model).to(device), cam_cfg, data, device)
    cpal = Stepper(model.to(device), cpal_cfg, data, device, bank=bank, context=context)
    return cam, cpal, bank


def profile_cpal(cpal: Stepper, steps: int = 3, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cpal.device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            cpal.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0", help="tiny | efficientnet_lite0 | resnet50")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=320, help="square input side (px)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of the CPAL step")
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.size = "tiny", 128
    reps = args.reps or (3 if args.quick else 6)
    device = C.resolve_device(args.device)
    threads = C.set_threads(args.threads)
    clock = C.resolve_clock(args.clock, device, threads)
    C.header("CPAL step vs CAM step")
    cam, cpal, bank = build(args.backbone, args.batch, args.size, device)
    print(f"setting: {args.backbone} (pretrained={cpal.cfg.model.pretrained}, proj 128), batch {args.batch}, "
          f"{args.size}x{args.size} px, "
          f"{device}; N={NUM_CLASSES}, N_p=50, K=20, D=128, bank 1000/class (in-process), {reps} reps")
    warmup = 1
    times = C.interleave({"cam_step": cam.step, "cpal_step": cpal.step}, reps=reps, warmup=warmup)
    cpu = {"cam_step": cam.cpu_seconds[warmup:], "cpal_step": cpal.cpu_seconds[warmup:]}
    wall_ratio = C.paired_ratio(times["cpal_step"], times["cam_step"])
    cpu_ratio = C.paired_ratio(cpu["cpal_step"], cpu["cam_step"])
    med = {k: C.median(v) for k, v in times.items()}
    C.print_table(["step", "median wall s", "min-max wall s", "median CPU s", "images/s"],
                  [[k, med[k], C.spread(v), C.median(cpu[k]), args.batch / med[k]] for k, v in times.items()])
    print(f"CPAL step: L_self over {cpal.last.get('self_images', 0)}/{args.batch} images, "
          f"pushed {sum(cpal.last.get('pushed', {}).values())} prototypes, context v{cpal.context.version}; "
          f"bank keys {len(bank.keys)}")
    print(f"wall: ratio of medians {med['cpal_step'] / med['cam_step']:.3f}, median of paired ratios {wall_ratio:.3f}; "
          f"CPU time: median of paired ratios {cpu_ratio:.3f}; headline clock: {clock}")
    ratio = cpu_ratio if clock == "cpu" else wall_ratio
    if cpal.last.get("self_images", 0) == 0:
        print("WARNING: no image took part in L_self: the CPAL step measured no PACAM work")
    if args.profile:
        profile_cpal(cpal)
    print(C.ratio_line("cpal_step/cam_step", ratio, "<=", 1.15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
