"""The paper's optimiser: SGD (momentum 0.9, wd 1e-4), backbone lr, x10 for new layers, poly decay.

The schedule steps once per *global* batch: with N data-parallel workers each doing
per-worker batch B/N, every worker takes the same number of steps, so the same schedule
runs everywhere and matches a single process with batch B.
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import PolynomialLR


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float | None = None,
                    new_layer_lr_mult: float | None = None) -> torch.optim.SGD:
    """SGD over ``model.param_groups(mult)``: backbone at ``lr``, new layers at ``lr * mult`` (``lr``
    and ``mult`` the run's ``Config.training``; default ``optim_cfg``'s); momentum and decay of ``optim_cfg``."""
    lr = optim_cfg.lr if lr is None else lr
    groups = []
    for g in model.param_groups(optim_cfg.new_layer_lr_mult if new_layer_lr_mult is None else new_layer_lr_mult):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr * g["lr_mult"], "lr_mult": g["lr_mult"]})
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum,
                           weight_decay=optim_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, power: float) -> PolynomialLR:
    """Poly decay lr_t = lr_0 (1 - t / total_steps) ** power, one step per global batch, 0 at the end."""
    return PolynomialLR(optimizer, total_iters=max(1, int(total_steps)), power=power)
