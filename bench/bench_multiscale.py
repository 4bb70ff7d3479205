"""Multi-scale CAM inference: batched vs the naive per-scale, per-image loop (target >= 1.3x images/s).

    python bench/bench_multiscale.py [--quick] [--backbone efficientnet_lite0] [--images 4] [--size 256]

Both variants compute the same maps (checked: max |difference| printed) for N real voc-mini
photos resized to one size, scales (1.0, 0.5, 1.5, 2.0) each with its flip (the config default):
- batched: ``batched_multiscale_cams(model, images, labels)``: per scale one forward of 2N views;
- naive: ``naive_multiscale_cams`` image by image: one forward per scale, per flip, per image.
- also shown: ``batched_multiscale_cams(..., max_batch=1)``, one image (2 views) per forward,
  which is what ``multiscale_cams`` / the CAM pipeline do.
Alternated (batched naive ..., then reversed); images/s from the median time. The system CPU
time and minor page faults of each variant are printed: on a CPU, large batched activations
(2N views at scale 2.0) are fresh ``mmap`` allocations that fault in page by page.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch

import _common as C
from cpal_ray.inference.multiscale import batched_multiscale_cams, naive_multiscale_cams

SCALES = (1.0, 0.5, 1.5, 2.0)


def load_images(count: int, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``count`` voc-mini photos resized to size x size, ImageNet-normalised (3, S, S), and their labels."""
    from PIL import Image

    from cpal_ray.config import DataConfig
    from cpal_ray.data import build_dataset
    from cpal_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    ds = build_dataset(DataConfig(), "val", train=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    images, labels = [], []
    for i in range(len(ds)):
        rgb, _, label = ds.read(i)
        if not np.asarray(label).any():
            continue
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.float32) / 255.0
        images.append((torch.from_numpy(rgb).permute(2, 0, 1) - mean) / std)
        labels.append(torch.as_tensor(np.asarray(label, np.float32)))
        if len(images) == count:
            break
    return images, labels


def main(argv=None) -> int:
    p = C.base_parser(__doc__)
    p.add_argument("--backbone", default="efficientnet_lite0", help="tiny | efficientnet_lite0 | resnet50")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    args = p.parse_args(argv)
    if args.quick:
        args.backbone, args.size = "tiny", 128
    reps = args.reps or (2 if args.quick else 4)
    device = C.resolve_device(args.device)
    threads = C.set_threads(args.threads)
    clock = C.resolve_clock(args.clock, device, threads)
    C.header("multi-scale CAMs: batched vs naive loop")

    from cpal_ray.config import ModelConfig
    from cpal_ray.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=args.backbone, pretrained=args.backbone == "efficientnet_lite0"), 20)
    model.to(device).eval()
    images, labels = load_images(args.images, args.size)
    print(f"setting: {args.backbone}, {len(images)} voc-mini photos at {args.size}x{args.size}, "
          f"scales {SCALES} + flip, "
          f"{device}; {reps} reps, headline clock: {clock}")
    out: dict[str, list] = {}
    cpu: dict[str, list[float]] = {}
    sys_s: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}

    def timed(name, fn):
        def run():
            C.sync(device)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0, c0 = time.perf_counter(), time.process_time()
            out[name] = fn()
            C.sync(device)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            cpu.setdefault(name, []).append(time.process_time() - c0)
            sys_s.setdefault(name, []).append(r1.ru_stime - r0.ru_stime)
            faults.setdefault(name, []).append(r1.ru_minflt - r0.ru_minflt)
            return time.perf_counter() - t0
        return run

    wall = C.interleave({
        "batched": timed("batched", lambda: batched_multiscale_cams(model, images, labels, scales=SCALES, flip=True)),
        "naive": timed("naive", lambda: [naive_multiscale_cams(model, im, lab, scales=SCALES, flip=True)
                                         for im, lab in zip(images, labels)]),
        "batched max_batch=1": timed("batched max_batch=1", lambda: batched_multiscale_cams(
            model, images, labels, scales=SCALES, flip=True, max_batch=1)),
    }, reps=reps, warmup=1)
    cpu = {k: v[1:] for k, v in cpu.items()}
    diff = max(float(np.abs(a["cam"] - b["cam"]).max()) for a, b in zip(out["batched"], out["naive"]))
    n = len(images)
    C.print_table(["variant", "median wall s", "min-max wall s", "median CPU s", "of which sys s", "minor faults",
                   "images/s"],
                  [[k, C.median(wall[k]), C.spread(wall[k]), C.median(cpu[k]), C.median(sys_s[k][1:]),
                    int(C.median(faults[k][1:])), n / C.median(cpu[k] if clock == "cpu" else wall[k])] for k in wall])
    ratio_wall = C.paired_ratio(wall["naive"], wall["batched"])
    ratio_cpu = C.paired_ratio(cpu["naive"], cpu["batched"])
    print(f"same maps: max |batched - naive| = {diff:.2e}; batched speed-up wall {ratio_wall:.2f}x, CPU time "
          f"{ratio_cpu:.2f}x; max_batch=1: CPU time {C.paired_ratio(cpu['naive'], cpu['batched max_batch=1']):.2f}x")
    print(C.ratio_line("batched/naive images/s", ratio_cpu if clock == "cpu" else ratio_wall, ">=", 1.3))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
