"""Training in plain PyTorch (no Ray): ``fit`` and its hooks, the epoch loop, optimiser, checkpoints;
the tasks' steps and hooks (CPAL's: ``engine.cpal_hooks``)."""
from cpal_ray.engine.checkpoint import (CheckpointError, checkpoint_state, load_checkpoint, load_first_valid,
                                        write_checkpoint)
from cpal_ray.engine.cpal_hooks import CPALHook, checkpoint_context, push_prototypes
from cpal_ray.engine.diagnostics_hook import DiagnosticsHook
from cpal_ray.engine.fit import FitResult, TrainState, fit
from cpal_ray.engine.hooks import CheckpointHook, Hook
from cpal_ray.engine.local import fit_local
from cpal_ray.engine.loop import train_one_epoch
from cpal_ray.engine.optim import build_optimizer, build_scheduler
from cpal_ray.engine.tasks import load_trained, task_hooks

__all__ = ["CPALHook", "CheckpointError", "CheckpointHook", "DiagnosticsHook", "FitResult", "Hook", "TrainState",
           "build_optimizer", "build_scheduler", "checkpoint_context", "checkpoint_state", "fit", "fit_local",
           "load_checkpoint", "load_first_valid", "load_trained", "push_prototypes", "task_hooks", "train_one_epoch",
           "write_checkpoint"]
