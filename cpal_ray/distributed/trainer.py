"""Driver side of distributed training: bank actor + ``TorchTrainer`` + final export.

``run_training(cfg)`` is the one call the workflows and the Tune trainable make. The run
folder is ``<storage_path>/<name>`` — a local folder on shared storage or an object-store URI
(``cpal_ray.storage``), handed to Ray Train as ``storage_path`` + ``storage_filesystem``. Ray
Train writes its checkpoints there; after the fit the deliverables (``final/model.pt``, loadable
with ``weights_only=True``, ``state.pt`` with the bank and its context prototypes, the config,
``summary.json`` and the per-epoch ``history.json``) are copied to ``<storage_path>/<name>/final``
from the last checkpoint, in the same storage. Running again with the same name resumes from
the last checkpoint (Ray Train restores it; ``engine.fit`` restores the bank from it).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass

import ray
import ray.train
from ray.train.torch import TorchTrainer

from cpal_ray.config import Config, ConfigError, save_config
from cpal_ray.distributed.bank import bank_actor_name, create_bank_actor, remove_bank_actor
from cpal_ray.distributed.runtime import output_location
from cpal_ray.distributed.train_loop import train_loop_per_worker
from cpal_ray.engine.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, checkpoint_context, load_checkpoint
from cpal_ray.storage import Location, relative_path

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    run_dir: Location          # <storage_path>/<name>
    final_dir: Location        # <run_dir>/final: the exported artefacts
    metrics: dict              # last reported metrics (rank 0)
    history: list              # per-epoch metrics
    checkpoint_dir: Location   # the last checkpoint Ray Train registered, in the storage


def build_trainer(cfg: Config, *, bank_actor: str | None, storage: Location, name: str,
                  callbacks=None) -> TorchTrainer:
    d = cfg.dist
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "bank_actor": bank_actor, "run_dir": str(storage / name)},
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.fs,
                                       failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
                                       callbacks=callbacks),
    )


def run_training(cfg: Config, *, callbacks=None, storage_path: str | None = None, name: str | None = None) -> TrainingResult:
    """Train with Ray Train (Ray must be initialised by the caller) and export the final artefacts."""
    name = name or cfg.train.name
    if cfg.train.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"train.mlflow_uri={cfg.train.mlflow_uri!r}: MLflow tracking needs `pip install mlflow`")
    storage = output_location(storage_path or cfg.train.storage_path, "train.storage_path")
    run_dir = storage / name
    save_config(cfg, run_dir / CONFIG_FILE)
    actor_name = bank_actor_name(name) if cfg.cpal.enabled else None
    # Keep the handle for the whole fit: a non-detached actor dies with its last handle.
    actor = create_bank_actor(cfg, actor_name) if actor_name else None
    try:
        result = build_trainer(cfg, bank_actor=actor_name, storage=storage, name=name, callbacks=callbacks).fit()
    finally:
        if actor is not None:
            remove_bank_actor(actor_name)
            del actor
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    history = [dict(m) for m in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [])]
    checkpoint = storage.join(relative_path(result.checkpoint.path, storage.path))
    final = export_final(checkpoint, run_dir / "final", history)
    return TrainingResult(run_dir=run_dir, final_dir=final, metrics=dict(result.metrics or {}), history=history,
                          checkpoint_dir=checkpoint)


def export_final(checkpoint: Location, out: Location, history: list | None = None) -> Location:
    """Copy the deliverables of a checkpoint folder to ``out``: weights, config, full state, and
    ``summary.json`` / ``history.json``. Works across local folders and object stores."""
    for f in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        (checkpoint / f).copy_to(out / f)
    state = load_checkpoint(checkpoint)
    summary = {"epochs_completed": state["epoch"], "global_step": state["global_step"],
               "context_version": context.version if (context := checkpoint_context(state)) else 0,
               "checkpoint": str(checkpoint), "metrics": state.get("metrics", {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history, indent=2, default=str))
    return out
