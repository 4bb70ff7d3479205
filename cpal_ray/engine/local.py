"""Training in one process (no Ray): ``fit`` with an in-process ``PrototypeBank``.

Checkpoints go to ``<out_dir>/epoch_NNN/`` (the files of ``cpal_ray.engine.checkpoint``); run
again into the same ``out_dir`` and training resumes after the newest one.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from cpal_ray.config import Config
from cpal_ray.cpal import PrototypeBank
from cpal_ray.engine.checkpoint import load_checkpoint, write_checkpoint
from cpal_ray.engine.fit import FitResult, fit

log = logging.getLogger(__name__)
EPOCH_DIR = re.compile(r"epoch_(\d{3,})$")


def latest_epoch_dir(out_dir: str | Path) -> Path | None:
    """The ``epoch_NNN`` folder of ``out_dir`` with the highest N, or None."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("epoch_*") if (m := EPOCH_DIR.match(p.name))]
    return max(found)[1] if found else None


def fit_local(cfg: Config, out_dir: str | Path | None = None, device: str = "cpu", model=None, dataset=None,
              hooks=()) -> FitResult:
    """Train ``cfg.train.epochs`` epochs in this process, checkpointing into ``out_dir`` when given."""
    from cpal_ray.models import embed_dim

    bank = PrototypeBank.from_config(cfg, embed_dim(cfg.model)) if cfg.cpal.enabled else None
    save_fn = resume = None
    if out_dir is not None:
        out = Path(out_dir)
        last = latest_epoch_dir(out)
        if last is not None:
            log.info("resuming from %s", last)
            resume = load_checkpoint(last)

        def save_fn(checkpoint, record):
            write_checkpoint(out / f"epoch_{record['epoch']:03d}", checkpoint)

    return fit(cfg, bank=bank, device=device, save_fn=save_fn, resume=resume, hooks=list(hooks), model=model,
               dataset=dataset)
