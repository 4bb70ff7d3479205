"""Training in one process (no Ray): ``fit`` with the task's hooks (``engine.tasks.task_hooks``,
with their in-process defaults).

Checkpoints go to ``<out_dir>/epoch_NNN/`` (the files of ``cpal_ray.engine.checkpoint``); run
again into the same ``out_dir`` and training resumes after the newest one that verifies (a
truncated or damaged newer one is skipped with a WARNING saying which and why).
"""
from __future__ import annotations

import logging
import re

from cpal_ray.config import Config
from cpal_ray.engine.checkpoint import load_first_valid, write_checkpoint
from cpal_ray.engine.fit import FitResult, fit
from cpal_ray.engine.tasks import task_hooks
from cpal_ray.storage import Location, location, remove_temp_files

log = logging.getLogger(__name__)
EPOCH_DIR = re.compile(r"epoch_(\d{3,})$")


def epoch_dirs(out_dir) -> list[Location]:
    """The ``epoch_NNN`` folders of ``out_dir``, newest (highest N) first."""
    found = [(int(m.group(1)), d) for d in location(out_dir).dirs() if (m := EPOCH_DIR.match(d.name))]
    return [d for _, d in sorted(found, key=lambda t: -t[0])]


def fit_local(cfg: Config, out_dir=None, device: str = "cpu", model=None, dataset=None, hooks=()) -> FitResult:
    """Train ``cfg.training.epochs`` epochs in this process, checkpointing into ``out_dir`` (a local
    path or URI) when given, with the run's records (TensorBoard, history.json, curves.png) there."""
    save_fn = resume = None
    if out_dir is not None:
        out = location(out_dir)
        for leftover in remove_temp_files(out):
            log.info("removed %s, left by a writer killed mid-write", leftover)
        found = load_first_valid(epoch_dirs(out))
        if found is not None:
            resume, folder = found
            log.info("resuming from %s", folder)

        def save_fn(checkpoint, record):
            write_checkpoint(out / f"epoch_{record['epoch']:03d}", checkpoint)

    return fit(cfg, device=device, save_fn=save_fn, resume=resume, hooks=[*task_hooks(cfg), *hooks], model=model,
               dataset=dataset, run_dir=out_dir)
