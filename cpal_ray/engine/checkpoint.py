"""Checkpoints: one definition of what a checkpoint holds, one folder layout, weights-only loading.

A checkpoint (``checkpoint_state``) is a dict of tensors and plain types:
  model      the unwrapped model's weights          optimizer, scheduler   their state dicts
  epoch      epochs completed                       global_step            steps completed
  config     the resolved config (dict)             metrics                the epoch's scalar metrics
  and one key per section a task's hooks fill (``engine.tasks.CHECKPOINT_SECTIONS``, through
  ``Hook.before_save_checkpoint``; None where no hook does, as in a baseline run; CPAL's is in
  ``engine.cpal_hooks``)

A checkpoint folder (``write_checkpoint``; Ray Train's checkpoint folders, ``epoch_NNN/`` of a
local run and every ``final/`` hold the same files):
  state.pt     the checkpoint dict (``torch.load(weights_only=True)``)
  model.pt     the weights alone (the exported artefact)
  config.yaml  the resolved config
  SHA256SUMS   the sha256 of the three, written last (``sha256sum -c SHA256SUMS`` checks them)

Loading verifies every file: ``verify_checkpoint`` reads each file ``SHA256SUMS`` lists and
raises ``CheckpointError`` naming the file when one is missing or differs from its checksum (a
truncated copy, a flipped bit), or when ``SHA256SUMS`` itself is unreadable or leaves out a file
of the folder. ``load_checkpoint`` (resume, export, inference) runs it first, then raises when
``state.pt`` is missing or not a cpal-ray checkpoint at all, and never suggests
``weights_only=False``; ``check_config_file`` does the same for a folder's ``config.yaml``. A folder
written before checksums existed loads when its state does. ``load_first_valid`` takes candidates
newest first and falls back past those that fail, saying which and why: local and Ray resumes use it.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re

import torch

from cpal_ray.config import Config, config_yaml, from_dict
from cpal_ray.models import unwrap
from cpal_ray.models.weights import load_tensors
from cpal_ray.storage import Location, location

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.yaml"
SUMS_FILE = "SHA256SUMS"
CHECKPOINT_FILES = (STATE_FILE, MODEL_FILE, CONFIG_FILE, SUMS_FILE)
_SUM_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S+)$")


class CheckpointError(ValueError):
    """A folder is not a usable cpal-ray checkpoint (missing, truncated, damaged, foreign); the
    message names the folder or file and why."""


def checkpoint_state(*, model: torch.nn.Module, cfg: Config, epoch: int, global_step: int = 0, optimizer=None,
                     scheduler=None, metrics: dict | None = None, sections: tuple[str, ...] = ()) -> dict:
    """The checkpoint dict (see the module docstring). ``epoch`` = epochs completed; ``model`` may be
    DDP-wrapped; ``sections``: the keys the hooks fill afterwards, None until they do."""
    return {
        "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "global_step": int(global_step),
        "config": cfg.to_dict(),
        **dict.fromkeys(sections),
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str))},
    }


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_checkpoint(folder, checkpoint: dict) -> Location:
    """Write a checkpoint folder (local path or URI; each file written atomically, ``SHA256SUMS``
    last, so a folder that has it is complete); returns it."""
    folder = location(folder)
    files = {STATE_FILE: _torch_bytes(checkpoint), MODEL_FILE: _torch_bytes(checkpoint["model"]),
             CONFIG_FILE: config_yaml(from_dict(checkpoint["config"])).encode()}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / SUMS_FILE).write_text("".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items()))
    return folder


def read_checksums(folder) -> dict[str, str]:
    """{file name: sha256} of a checkpoint folder's ``SHA256SUMS`` ({} when it has none).
    CheckpointError when a line of it is not a checksum line (a damaged record checks nothing)."""
    path = location(folder) / SUMS_FILE
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not (m := _SUM_LINE.match(line.strip())):
            raise CheckpointError(f"{path}: line {number} is not '<sha256>  <file>' (damaged)")
        sums[m.group(2)] = m.group(1)
    return sums


def _checked_bytes(path: Location, expected: str | None) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (listed in {SUMS_FILE})") from None
    except OSError as e:
        raise CheckpointError(str(e)) from None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"{path}: damaged or truncated ({len(data)} bytes whose sha256 is not the one in "
                              f"{SUMS_FILE})")
    return data


def verify_checkpoint(folder) -> dict[str, bytes]:
    """Read the checkpoint files of ``folder`` and check each against ``SHA256SUMS``; returns
    {name: bytes} of the files present.

    CheckpointError naming the file: listed but missing, or different from its checksum; present
    but left out of ``SHA256SUMS``; ``SHA256SUMS`` unreadable. A folder without ``SHA256SUMS``
    (written before checksums existed) is returned unchecked."""
    folder = location(folder)
    sums = read_checksums(folder)
    present = {f.name for f in folder.list()}
    if sums:
        unlisted = sorted(n for n in (STATE_FILE, MODEL_FILE, CONFIG_FILE) if n in present and n not in sums)
        if unlisted:
            raise CheckpointError(f"{folder / SUMS_FILE}: does not list {', '.join(unlisted)} (damaged)")
        return {name: _checked_bytes(folder / name, digest) for name, digest in sums.items()}
    return {name: _checked_bytes(folder / name, None) for name in (STATE_FILE, MODEL_FILE, CONFIG_FILE)
            if name in present}


def check_config_file(folder) -> None:
    """Check the ``config.yaml`` of a checkpoint or ``final/`` folder against its ``SHA256SUMS`` (a
    folder without one, a CAM folder say, passes). CheckpointError naming the file when it is
    damaged: never a damaged file read as defaults."""
    folder = location(folder)
    expected = read_checksums(folder).get(CONFIG_FILE)
    if expected is not None:
        _checked_bytes(folder / CONFIG_FILE, expected)


def load_checkpoint(folder, map_location="cpu") -> dict:
    """Verify every file of a checkpoint folder (local path or URI; ``verify_checkpoint``), read its
    ``state.pt`` (weights_only) and rebuild its Config. ``CheckpointError`` names the folder or file
    when it is not a usable checkpoint."""
    folder = location(folder)
    path = folder / STATE_FILE
    files = verify_checkpoint(folder)
    if STATE_FILE not in files:
        raise CheckpointError(f"{folder}: not a cpal-ray checkpoint (no {STATE_FILE})")
    try:
        state = load_tensors(files[STATE_FILE], str(path), map_location=map_location)
    except ValueError as e:
        raise CheckpointError(f"{e}: {folder} is not a cpal-ray checkpoint") from None
    if not isinstance(state, dict) or not {"model", "epoch", "config"} <= set(state):
        raise CheckpointError(f"{path}: not a cpal-ray checkpoint (no model, epoch and config in it)")
    state["config"] = from_dict(state["config"])
    return state


def checkpoint_digest(folder) -> str:
    """The content hash of a checkpoint or ``final/`` folder: the sha256 of its ``SHA256SUMS`` (of
    ``state.pt`` for a folder written before checksums existed). Retraining into the same folder
    changes it; copying the folder does not."""
    folder = location(folder)
    sums = folder / SUMS_FILE
    return hashlib.sha256((sums if sums.is_file() else folder / STATE_FILE).read_bytes()).hexdigest()


def load_first_valid(folders, map_location="cpu") -> tuple[dict, Location] | None:
    """The first of ``folders`` (give them newest first) that loads and verifies, as (state, folder).

    Each one skipped is logged at WARNING with the reason. None when ``folders`` is empty;
    CheckpointError listing every folder and reason when none is usable (never a silent restart).
    """
    problems = []
    for folder in folders:
        try:
            return load_checkpoint(folder, map_location=map_location), location(folder)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", folder, e)
            problems.append(str(e))
    if problems:
        raise CheckpointError(f"no usable checkpoint among {len(problems)}: " + "; ".join(problems))
    return None
