"""Training in plain PyTorch (no Ray): ``fit`` and its hooks, the epoch loop, optimiser, checkpoints."""
from cpal_ray.engine.checkpoint import (CheckpointError, checkpoint_context, checkpoint_state, load_checkpoint,
                                        load_first_valid, load_trained, write_checkpoint)
from cpal_ray.engine.diagnostics import DiagnosticsHook
from cpal_ray.engine.fit import FitResult, TrainState, fit
from cpal_ray.engine.hooks import CheckpointHook, ClusterHook, Hook
from cpal_ray.engine.local import fit_local
from cpal_ray.engine.loop import push_prototypes, train_one_epoch
from cpal_ray.engine.optim import build_optimizer, build_scheduler

__all__ = ["CheckpointError", "CheckpointHook", "ClusterHook", "DiagnosticsHook", "FitResult", "Hook", "TrainState",
           "build_optimizer", "build_scheduler", "checkpoint_context", "checkpoint_state", "fit", "fit_local",
           "load_checkpoint", "load_first_valid", "load_trained", "push_prototypes", "train_one_epoch",
           "write_checkpoint"]
