"""Checkpoint files: the whole run in one folder, loadable with ``torch.load(weights_only=True)``.

Layout of a checkpoint folder:
  state.pt     model, optimizer, scheduler, epoch (completed), global step, config dict,
               bank state (``PrototypeBank.state_dict()``) and the context prototypes
  model.pt     the unwrapped model's weights only (the exported artefact)
  config.yaml  the resolved config
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from cpal_ray.config import Config, from_dict, save_config

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                    epoch: int, global_step: int, cfg: Config, bank_state: dict | None = None,
                    context: dict | None = None, metrics: dict | None = None) -> Path:
    """Write a checkpoint folder (files replaced atomically). ``epoch`` = epochs completed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net = model.module if hasattr(model, "module") else model
    weights = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    state = {
        "model": weights,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": cfg.to_dict(),
        "bank": bank_state,
        "context": context,
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
    }
    _atomic_save(state, folder / STATE_FILE)
    _atomic_save(weights, folder / MODEL_FILE)
    save_config(cfg, folder / CONFIG_FILE)
    return folder


def load_checkpoint(folder: str | os.PathLike, map_location="cpu") -> dict:
    """Read ``state.pt`` of a checkpoint folder (weights_only) and rebuild its Config."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint state here")
    state = torch.load(path, map_location=map_location, weights_only=True)
    state["config"] = from_dict(state["config"])
    return state


def context_from_state(state: dict):
    """The checkpoint's context prototypes as an engine ``Context`` (None if there were none)."""
    from cpal_ray.engine.loop import Context

    ctx = state.get("context")
    if not ctx or int(ctx.get("version", 0)) == 0:
        return None
    return Context(ctx["prototypes"].float(), ctx["counts"].long(), int(ctx["version"]))


def load_trained(folder: str | os.PathLike, map_location="cpu", cfg: Config | None = None):
    """Rebuild a trained model from a checkpoint or ``final/`` folder.

    Returns (model in eval mode, Config (the saved one unless ``cfg`` is given), Context or None).
    No ImageNet weights are loaded (the checkpoint has all of them).
    """
    import dataclasses

    from cpal_ray.models import build_model

    state = load_checkpoint(folder, map_location=map_location)
    cfg = cfg or state["config"]
    model = build_model(dataclasses.replace(cfg.model, pretrained=False, weights=""), cfg.data.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, context_from_state(state)
