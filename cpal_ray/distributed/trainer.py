"""Driver side of distributed training: bank actor + ``TorchTrainer`` + final export.

``run_training(cfg)`` is the one call the workflows and the Tune trainable make. The run
folder is ``<storage_path>/<name>``: Ray Train's checkpoints live there, and after the fit the
final weights (``final/model.pt``, loadable with ``weights_only=True``), context prototypes,
config and per-epoch history are copied to ``<storage_path>/<name>/final``. Running again with
the same name resumes from the last checkpoint (Ray Train restores it; the loop restores the
bank from it).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train.torch import TorchTrainer

from cpal_ray.config import Config, save_config
from cpal_ray.distributed.bank import bank_actor_name, create_bank_actor, remove_bank_actor
from cpal_ray.distributed.train_loop import train_loop_per_worker
from cpal_ray.engine.checkpoint import CONFIG_FILE, MODEL_FILE, STATE_FILE, checkpoint_context, load_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    run_dir: Path          # <storage_path>/<name> (a local mirror when storage is a URI)
    final_dir: Path        # exported artefacts
    metrics: dict          # last reported metrics (rank 0)
    history: list          # per-epoch metrics
    checkpoint_dir: Path   # the last checkpoint folder


def resolve_storage(path: str) -> str:
    """Absolute local path (Ray needs one) or a URI left as it is."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def build_trainer(cfg: Config, *, bank_actor: str | None, callbacks=None, storage_path: str | None = None,
                  name: str | None = None) -> TorchTrainer:
    d = cfg.dist
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "bank_actor": bank_actor},
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name or cfg.train.name,
                                       storage_path=resolve_storage(storage_path or cfg.train.storage_path),
                                       failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
                                       callbacks=callbacks),
    )


def run_training(cfg: Config, *, callbacks=None, storage_path: str | None = None, name: str | None = None) -> TrainingResult:
    """Train with Ray Train (Ray must be initialised by the caller) and export the final artefacts."""
    name = name or cfg.train.name
    storage = resolve_storage(storage_path or cfg.train.storage_path)
    remote = "://" in storage
    # With object storage (s3://…) Ray Train writes checkpoints there itself; our files are
    # written to a local mirror first and uploaded at the end.
    run_dir = Path(tempfile.gettempdir()) / "cpal-ray-runs" / name if remote else Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    actor_name = bank_actor_name(name) if cfg.cpal.enabled else None
    # Keep the handle for the whole fit: a non-detached actor dies with its last handle.
    actor = create_bank_actor(cfg, actor_name) if actor_name else None
    try:
        trainer = build_trainer(cfg, bank_actor=actor_name, callbacks=callbacks, storage_path=storage, name=name)
        result = trainer.fit()
    finally:
        if actor is not None:
            remove_bank_actor(actor_name)
            del actor
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    history = [dict(m) for m in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [])]
    with result.checkpoint.as_directory() as folder:
        final = export_final(Path(folder), run_dir / "final", history)
        ckpt_dir = Path(result.checkpoint.path) if not remote else Path(folder)
    if remote:
        import pyarrow.fs

        pyarrow.fs.copy_files(str(run_dir), f"{storage.rstrip('/')}/{name}")
        log.info("uploaded %s to %s/%s", run_dir, storage, name)
    return TrainingResult(run_dir=run_dir, final_dir=final, metrics=dict(result.metrics or {}), history=history,
                          checkpoint_dir=ckpt_dir)


def export_final(checkpoint_folder: Path, out: Path, history: list | None = None) -> Path:
    """Copy the deliverables of a checkpoint: weights, config, context prototypes, history."""
    out.mkdir(parents=True, exist_ok=True)
    for f in (MODEL_FILE, CONFIG_FILE, STATE_FILE):
        shutil.copy2(checkpoint_folder / f, out / f)
    state = load_checkpoint(checkpoint_folder)
    summary = {"epochs_completed": state["epoch"], "global_step": state["global_step"],
               "context_version": context.version if (context := checkpoint_context(state)) else 0,
               "metrics": state.get("metrics", {})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if history is not None:
        (out / "history.json").write_text(json.dumps(history, indent=2, default=str))
    return out
