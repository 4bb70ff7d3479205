"""Records of a run, written as it goes (rank 0), into its run folder (a local path or a URI):

  tensorboard/    TensorBoard event files: the loss terms and lr every ``train.log_every`` steps
                  (``step/…``) and every scalar of each epoch's record (``epoch/…``)
  history.json    the records of the epochs so far, rewritten after each epoch
  curves.png      losses, lr, L_self shares, seed mIoU of CAM and PACAM, contrast, bank (after each epoch)

Open with ``tensorboard --logdir <run folder>`` (``tensorboard`` is installed with cpal-ray; for an
object store: copy the folder first, or point TensorBoard at the URI where it supports it). The
event writer is closed at the end of every epoch (a flush alone leaves the events still queued in
its writer thread out of the file): each epoch's events are in their own complete file
(``….epoch<N>``), also when a run is stopped or killed in a later epoch. ``MlflowHook`` sends the same epoch scalars
to MLflow through Ray's integration (``ray.air.integrations.mlflow.setup_mlflow``, in the Ray
Train worker) when a run sets ``train.mlflow_uri``.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from cpal_ray.engine.hooks import RECORD, Hook
from cpal_ray.formatting import is_finite, json_safe, strict_json
from cpal_ray.storage import location

log = logging.getLogger(__name__)
TENSORBOARD_DIR, HISTORY_FILE, CURVES_FILE = "tensorboard", "history.json", "curves.png"


def epoch_scalars(record: dict) -> dict[str, float]:
    """The finite numbers of an epoch's record (lists, strings and NaN left out)."""
    return {k: float(v) for k, v in record.items() if is_finite(v) and k != "epoch"}


class TrackingHook(Hook):
    """TensorBoard events, ``history.json`` and ``curves.png`` in ``run_dir`` (module docstring)."""

    priority = RECORD

    def __init__(self, run_dir, name: str = "run"):
        self.run_dir, self.name = location(run_dir), name
        self.history: list[dict] = []
        self._writer = None
        self._epoch = 0  # names the event file of the epoch being written
        self._local = None  # where the event files are written before an object store gets them

    def _tensorboard(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            target = self.run_dir / TENSORBOARD_DIR
            if target.is_local:
                folder = target.local_path
            else:
                self._local = tempfile.TemporaryDirectory(prefix="cpal-ray-tb-")
                folder = Path(self._local.name)
            self._writer = SummaryWriter(str(folder), filename_suffix=f".epoch{self._epoch}")
        return self._writer

    def close(self) -> None:
        """Write every queued event and close the event file (the next event opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def before_epoch(self, state) -> None:
        self._epoch = state.epoch

    def after_step(self, state, step: int, outputs: dict | None = None) -> None:
        if state.rank != 0 or state.logged is None:
            return
        global_step = state.epoch * state.steps_per_epoch + step
        for key, value in state.logged.items():
            self._tensorboard().add_scalar(f"step/{key}", value, global_step)

    def after_epoch(self, state, record: dict) -> None:
        if state.rank != 0:
            return
        if not self.history and record["epoch"] > 0 and (self.run_dir / HISTORY_FILE).is_file():
            # A resumed run: keep the records of the epochs before the one it resumed at.
            earlier = json.loads((self.run_dir / HISTORY_FILE).read_text())
            self.history = [r for r in earlier if r.get("epoch", 0) < record["epoch"]]
        writer = self._tensorboard()
        for key, value in epoch_scalars(record).items():
            writer.add_scalar(f"epoch/{key}", value, record["epoch"])
        self.close()
        if self._local is not None:  # an object store: upload the event files as they are now
            location(self._local.name).copy_to(self.run_dir / TENSORBOARD_DIR)
        self.history.append(json_safe(dict(record)))
        (self.run_dir / HISTORY_FILE).write_text(strict_json(self.history, indent=2))
        from cpal_ray.inference.visuals import diagnostic_curves

        diagnostic_curves({self.name: self.history}, self.run_dir / CURVES_FILE)


class MlflowHook(Hook):
    """Each epoch's scalars to an MLflow run (``client``: the module ``setup_mlflow`` returns; it
    is a no-op on ranks other than 0)."""

    def __init__(self, client):
        self.client = client

    def after_epoch(self, state, record: dict) -> None:
        self.client.log_metrics(epoch_scalars(record), step=int(record["epoch"]))
