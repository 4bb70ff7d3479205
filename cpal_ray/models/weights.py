"""Weight files: read a state_dict safely, load it with clear errors, export a model's weights.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: tensors and
plain containers only, no pickled code. Accepted layouts: a plain state_dict, or a dict holding
it under ``"state_dict"`` or ``"model"`` (common training-checkpoint layouts). ``module.``
prefixes left by (Distributed)DataParallel are stripped.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

_NESTED_KEYS = ("state_dict", "model")
_SHOW = 8  # keys listed in an error message before "... and n more"


def _preview(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{keys[:_SHOW]}{more}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside (Distributed)DataParallel, or ``model`` itself."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module
    return model


def load_tensors(source: str | os.PathLike | bytes, name: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` of a file (path or its bytes). When torch cannot read it,
    ValueError naming ``name`` and the reason, never torch's advice to retry with
    ``weights_only=False`` (that would run whatever code a crafted or foreign file carries)."""
    try:
        return torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location=map_location,
                          weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a weights-only file we can read
        raise ValueError(f"{name}: not a weights-only torch file cpal-ray can read ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """Why torch refused a file, without its advice (see ``load_tensors``)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    return f"{type(e).__name__}: {lines[0] if lines else 'unsupported content'}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat {name: tensor} dict on the CPU.

    Raises FileNotFoundError (naming the path) when there is no such file, and ValueError when
    the file cannot be read with ``weights_only=True`` or holds no state_dict.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    obj = load_tensors(p, str(p))
    for key in _NESTED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{p}: entry {name!r} is a {type(value).__name__}, not a tensor; "
                             f"top-level keys: {_preview([str(k) for k in obj])}")
        while name.startswith("module."):
            name = name[len("module."):]
        state[name] = value
    return state


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                            ignore_prefixes: tuple[str, ...] = (), strict: bool = True) -> None:
    """Copy ``state`` into ``module``, checking key sets before anything is written.

    Keys starting with one of ``ignore_prefixes`` are dropped first (e.g. ``"fc."``, the
    ImageNet classifier). Missing keys always raise ValueError (a BatchNorm's
    ``num_batches_tracked`` may be absent, as in pre-1.0 files); unexpected keys raise when
    ``strict`` and warn otherwise. A shape mismatch raises ValueError. ``source`` names the file
    in every message. Nothing is written into ``module`` when a check fails.
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    expected = set(own)
    missing = [k for k in expected - set(state) if not k.endswith("num_batches_tracked")]
    unexpected = list(set(state) - expected)
    if missing:
        raise ValueError(f"{source}: {len(missing)} weights missing from the file: {_preview(missing)}; "
                         f"the file has {_preview(list(state))}")
    if unexpected:
        msg = f"{source}: {len(unexpected)} unexpected keys in the file: {_preview(unexpected)}"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + " (ignored)", stacklevel=3)
        state = {k: v for k, v in state.items() if k in expected}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: {len(wrong)} size mismatches: {_preview(wrong)}")
    module.load_state_dict(state, strict=False)


def export_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save the model's state_dict as a plain {name: tensor} dict (CPU tensors, no wrapper prefix).

    The file loads with ``torch.load(path, weights_only=True)``; parent folders are created.
    """
    state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, p)
    return p


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by ``export_weights`` (or a checkpoint holding "model"/"state_dict").

    Returns ``model``. Raises FileNotFoundError / ValueError as ``read_state_dict`` and
    ``load_state_dict_checked`` do.
    """
    load_state_dict_checked(_unwrap(model), read_state_dict(path), str(path), strict=strict)
    return model
