"""The paper's optimiser: SGD (momentum 0.9, wd 1e-4), backbone lr, x10 for new layers, poly decay.

The schedule steps once per *global* batch: with N data-parallel workers each doing
per-worker batch B/N, every worker takes the same number of steps, so the same schedule
runs everywhere and matches a single process with batch B.
"""
from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.SGD:
    """SGD over ``model.param_groups(mult)``: backbone at ``lr``, new layers at ``lr * mult``."""
    groups = []
    for g in model.param_groups(optim_cfg.new_layer_lr_mult):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": optim_cfg.lr * g["lr_mult"], "lr_mult": g["lr_mult"]})
    return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay)


def poly_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr_0 * (1 - t / total_steps) ** power, one step per global batch."""
    total = max(1, int(total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - min(t, total) / total) ** power)


def steps_per_epoch(num_images: int, global_batch: int, max_steps: int = 0) -> int:
    """Global batches per epoch (the last partial batch is dropped, as IRN/SIPE do)."""
    n = max(1, num_images // global_batch) if num_images >= global_batch else 1
    return min(n, max_steps) if max_steps > 0 else n


def total_steps(num_images: int, global_batch: int, epochs: int, max_steps: int = 0) -> int:
    return steps_per_epoch(num_images, global_batch, max_steps) * epochs

