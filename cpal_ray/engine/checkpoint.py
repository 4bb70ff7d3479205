"""Checkpoints: one definition of what a checkpoint holds, one folder layout, weights-only loading.

A checkpoint (``checkpoint_state``) is a dict of tensors and plain types:
  model      the unwrapped model's weights          optimizer, scheduler   their state dicts
  epoch      epochs completed                       global_step            steps completed
  config     the resolved config (dict)             metrics                the epoch's scalar metrics
  bank       the bank's ``state_dict()`` — its entries, keys and the context prototypes of the
             clustering made at the end of this epoch (None for the BCE baseline)

A checkpoint folder (``write_checkpoint``; Ray Train's checkpoint folders, ``epoch_NNN/`` of a
local run and every ``final/`` hold the same files):
  state.pt     the checkpoint dict (``torch.load(weights_only=True)``)
  model.pt     the weights alone (the exported artefact)
  config.yaml  the resolved config
"""
from __future__ import annotations

import dataclasses
import io

import torch

from cpal_ray.config import Config, from_dict, save_config
from cpal_ray.storage import Location, location

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"


def checkpoint_state(*, model: torch.nn.Module, cfg: Config, epoch: int, global_step: int = 0, optimizer=None,
                     scheduler=None, bank=None, metrics: dict | None = None) -> dict:
    """The checkpoint dict (see the module docstring). ``epoch`` = epochs completed; ``model`` may be
    DDP-wrapped; ``bank``: anything with ``state_dict()`` (None for the baseline)."""
    from cpal_ray.models import unwrap

    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": cfg.to_dict(),
        "bank": bank.state_dict() if bank is not None else None,
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
    }


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint(folder, checkpoint: dict) -> Location:
    """Write a checkpoint folder (local path or URI; each file written atomically); returns it."""
    folder = location(folder)
    (folder / STATE_FILE).write_bytes(_torch_bytes(checkpoint))
    (folder / MODEL_FILE).write_bytes(_torch_bytes(checkpoint["model"]))
    save_config(from_dict(checkpoint["config"]), folder / CONFIG_FILE)
    return folder


def load_checkpoint(folder, map_location="cpu") -> dict:
    """Read ``state.pt`` of a checkpoint folder (local path or URI; weights_only) and rebuild its Config."""
    path = location(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint state here")
    state = torch.load(io.BytesIO(path.read_bytes()), map_location=map_location, weights_only=True)
    state["config"] = from_dict(state["config"])
    return state


def checkpoint_context(state: dict):
    """The context prototypes a checkpoint holds (inside its bank state), or None."""
    from cpal_ray.cpal.bank import Context

    bank = state.get("bank")
    return Context.from_state(bank["context"]) if bank else None


def load_trained(folder, map_location="cpu", cfg: Config | None = None):
    """Rebuild a trained model from a checkpoint or ``final/`` folder.

    Returns (model in eval mode, Config (the saved one unless ``cfg`` is given), Context or None).
    No ImageNet weights are loaded (the checkpoint has all of them).
    """
    from cpal_ray.models import build_model

    state = load_checkpoint(folder, map_location=map_location)
    cfg = cfg or state["config"]
    model = build_model(dataclasses.replace(cfg.model, pretrained=False, weights=""), cfg.data.num_classes)
    model.load_state_dict(state["model"])
    model.eval()
    return model, cfg, checkpoint_context(state)
