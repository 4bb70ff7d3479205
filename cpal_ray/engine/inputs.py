"""A run's inputs, checked before anything starts (no Ray): fail fast, write nothing.

A missing dataset folder, an unreadable id list or label file, an id list with no usable id, a
backbone whose weights file is missing or does not fit: none of these gets better by retrying,
so the drivers (``run_training``, the pipelines, the workflows before they start Ray) call the
checks here first, and Ray Train is told not to retry the errors of ``NOT_RETRYABLE`` when a
worker raises one later (a bad image in ``on_bad_sample=error`` mode, a non-finite loss at a
deterministic step, no checkpoint that verifies).
"""
from __future__ import annotations

import dataclasses

from cpal_ray.config import Config, ConfigError
from cpal_ray.data import build_train_dataset, record_labels_source
from cpal_ray.data.files import DataError
from cpal_ray.engine.checkpoint import CheckpointError
from cpal_ray.models import build_task_model
from cpal_ray.storage import StorageError

# Errors a person fixes in a command, a config, a folder or a file: a workflow reports them in one
# line with exit status 2 (``workflows.common.run``) instead of a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, FileNotFoundError, NotADirectoryError)
# Errors of a training worker that fail the run at once, whatever dist.max_failures says.
NOT_RETRYABLE = (ConfigError, DataError, CheckpointError, FloatingPointError)


def check_training_inputs(cfg: Config) -> Config:
    """Check what a training run reads before it starts; returns ``cfg`` with ``data.cls_labels``
    naming the label file in use (``cpal_ray.data.record_labels_source``).

    Builds the training split (the root exists; the id list and labels read; at least one usable
    id; images exist, not decoded) and the model (backbone, weights file). Raises DataError or
    ConfigError naming what is wrong.
    """
    dataset = build_train_dataset(cfg)  # for the refine stages, also their label folder
    try:
        build_task_model(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"model: {e}") from e
    return dataclasses.replace(cfg, data=record_labels_source(cfg.data, dataset))

