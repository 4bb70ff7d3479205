"""Ctrl-C during a training run: Ray Train aborts the workers, cpal-ray says where to resume.

Ray Train's ``fit`` installs its own SIGINT handler (it aborts the run's controller, which stops
the workers) and then ends with ``SystemExit`` or an actor error that says nothing about the
run. ``InterruptibleTorchTrainer`` notes that the signal came, keeping Ray's handler and its
abort; ``run_training`` then raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``) whose
message is the one line a person needs::

    interrupted at epoch 2 (2 of 5 epochs checkpointed); run the same command to resume from epoch 2

and ``history.json`` of the run folder keeps only the epochs that have a checkpoint (the epoch
that was running may have written its record before its checkpoint). ``workflows.common.run``
prints the line and exits with status 130 (128 + SIGINT), as shells do.
"""
from __future__ import annotations

import json
import logging
import signal
import threading

from ray.train.torch import TorchTrainer

from cpal_ray.engine.tracking import HISTORY_FILE
from cpal_ray.formatting import strict_json
from cpal_ray.storage import Location

log = logging.getLogger(__name__)
# Ray Train's record of the checkpoints it registered (with the metrics each was reported with).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a training run; the message says where it resumes."""


class InterruptibleTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose ``interrupted`` tells whether SIGINT arrived during ``fit``. Ray's
    own handler still runs (it aborts the run); the handler before ``fit`` is put back after it."""

    interrupted = False

    def _register_sigint_handler(self, controller) -> None:
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def note_and_abort(signum, frame):
            self.interrupted = True
            if callable(ray_handler):
                ray_handler(signum, frame)

        signal.signal(signal.SIGINT, note_and_abort)

    def fit(self):
        if threading.current_thread() is not threading.main_thread():  # a Tune trial: no handler of its own
            return super().fit()
        previous = signal.getsignal(signal.SIGINT)
        try:
            return super().fit()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def checkpointed_epochs(run_dir: Location) -> int:
    """Epochs completed by the newest checkpoint Ray Train registered in ``run_dir`` (0: none)."""
    snapshot = run_dir / SNAPSHOT_FILE
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"] if snapshot.is_file() else []
        return max((int(r["metrics"]["epoch"]) + 1 for r in results), default=0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s)", snapshot, e)
        return 0


def keep_checkpointed_history(run_dir: Location, epochs: int) -> None:
    """Drop from ``run_dir/history.json`` the records of epochs ``>= epochs`` (no checkpoint)."""
    path = run_dir / HISTORY_FILE
    try:
        history = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); left as it is", path, e)
        return
    kept = [r for r in history if isinstance(r, dict) and int(r.get("epoch", 0)) < epochs]
    if len(kept) != len(history):
        path.write_text(strict_json(kept, indent=2))


def interrupted(run_dir: Location, total_epochs: int) -> TrainingInterrupted:
    """After Ctrl-C: trim the run's history to its checkpointed epochs and return the error to raise."""
    done = checkpointed_epochs(run_dir)
    keep_checkpointed_history(run_dir, done)
    saved = f"{done} of {total_epochs} epochs checkpointed" if done else "no epoch checkpointed"
    return TrainingInterrupted(f"interrupted at epoch {done} ({saved}); run the same command to resume from "
                               f"epoch {done}")
