"""Driver side of distributed training: bank actor + ``TorchTrainer`` + final export.

``run_training(cfg)`` is the one call the workflows and the Tune trainable make. The run
folder is ``<storage_path>/<name>`` — a local folder on shared storage or an object-store URI
(``cpal_ray.storage``), handed to Ray Train as ``storage_path`` + ``storage_filesystem``. Ray
Train writes its checkpoints there; after the fit the deliverables (``final/model.pt``, loadable
with ``weights_only=True``, ``state.pt`` with the bank and its context prototypes, the config,
``summary.json`` and the per-epoch ``history.json``) are copied to ``<storage_path>/<name>/final``
from the last checkpoint, in the same storage. Running again with the same name resumes from
the last checkpoint (Ray Train restores it; ``engine.fit`` restores the bank from it).

Failing fast and safe: the inputs are checked before Ray Train starts
(``engine.inputs.check_training_inputs``: nothing is written when they fail); a worker error
that retrying cannot fix (``NOT_RETRYABLE``: data, config, checkpoint errors, a non-finite loss)
ends the run at once whatever ``dist.max_failures`` says (``FailFast``) and is raised as itself;
checkpoint folders that Ray Train never registered (a driver killed between a worker writing
one and the controller recording it) are removed before a run resumes, and only in a run folder
this project's record (``RUN_RECORD``) says it made, with Ray Train's record of its checkpoints:
any other folder of checkpoints is refused with its path. A resumed run's config is compared
with the saved one before Ray starts (``engine.resume``: frozen fields refused, the rest logged).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import ray
import ray.train

from cpal_ray.config import Config, ConfigError, check_run_name, load_config, save_config
from cpal_ray.distributed.bank_actor import bank_actor_names, create_bank_actors, remove_bank_actor
from cpal_ray.distributed.interrupt import SNAPSHOT_FILE, InterruptibleTorchTrainer, interrupted
from cpal_ray.distributed.runtime import interactive, output_location
from cpal_ray.distributed.train_loop import CHECKPOINT_PREFIX, train_loop_per_worker
from cpal_ray.engine.checkpoint import CONFIG_FILE, SUMS_FILE, CheckpointError, load_checkpoint, verify_checkpoint
from cpal_ray.engine.cpal_hooks import checkpoint_context
from cpal_ray.engine.inputs import NOT_RETRYABLE, check_training_inputs
from cpal_ray.engine.resume import check_resume
from cpal_ray.formatting import strict_json
from cpal_ray.storage import Location, relative_path, remove_temp_files

log = logging.getLogger(__name__)
# This project's record that it made a run folder: nothing in a folder without it is deleted.
RUN_RECORD = ".cpal-ray-run.json"


@dataclass
class TrainingResult:
    run_dir: Location          # <storage_path>/<name>
    final_dir: Location        # <run_dir>/final: the exported artefacts
    metrics: dict              # last reported metrics (rank 0)
    history: list              # per-epoch metrics
    checkpoint_dir: Location   # the last checkpoint Ray Train registered, in the storage


class FailFast(ray.train.UserCallback):
    """Runs in Ray Train's controller: when a worker raised an error of ``NOT_RETRYABLE``, raise it
    there, which ends the run (a controller error is not retried) instead of restarting the
    workers into the same error up to ``dist.max_failures`` times."""

    def after_exception(self, run_context, worker_exceptions) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, NOT_RETRYABLE):
                log.error("rank %d: %s: %s; not retried", rank, type(error).__name__, error)
                raise error


def registered_checkpoints(run_dir: Location) -> list[str] | None:
    """Names of the checkpoint folders Ray Train registered in ``run_dir`` ([] when it has no
    record; None: a record that cannot be read)."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return []
    try:
        return [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (ValueError, KeyError, TypeError) as e:
        log.warning("%s: unreadable (%s); no checkpoint folder is removed", snapshot, e)
        return None


def checkpoint_folders(run_dir: Location) -> list[Location]:
    return [d for d in run_dir.dirs() if d.name.startswith(CHECKPOINT_PREFIX)]


def made_by_older_cpal_ray(run_dir: Location) -> bool:
    """A run folder of a cpal-ray from before ``RUN_RECORD``: Ray Train's snapshot and the run's
    ``config.yaml``, a cpal-ray config naming this run (what ``run_training`` always wrote)."""
    try:
        return ((run_dir / SNAPSHOT_FILE).is_file()
                and load_config(run_dir / CONFIG_FILE).train.name == run_dir.name)
    except (ConfigError, OSError, ValueError):
        return False


def check_run_folder(run_dir: Location) -> None:
    """Refuse a run folder holding checkpoints this project has no record of writing: a folder
    without ``RUN_RECORD`` (another program's, or copied by hand; a run of an older cpal-ray is
    recognised by ``made_by_older_cpal_ray``), or one whose checkpoints Ray
    Train never recorded (no ``checkpoint_manager_snapshot.json``). Nothing there is resumed
    from or deleted; the CheckpointError says how to proceed."""
    found = checkpoint_folders(run_dir)
    if not found:
        return
    if not (run_dir / RUN_RECORD).is_file() and not made_by_older_cpal_ray(run_dir):
        raise CheckpointError(f"{run_dir}: holds {len(found)} checkpoint folder(s) cpal-ray has no record of writing "
                              f"(no {RUN_RECORD}); nothing is resumed or deleted: move them away or choose another "
                              f"train.name")
    if not (run_dir / SNAPSHOT_FILE).is_file():
        raise CheckpointError(f"{run_dir}: holds {len(found)} checkpoint folder(s) but no {SNAPSHOT_FILE} (Ray "
                              f"Train's record of them); nothing is resumed or deleted: move them away to start "
                              f"afresh, or choose another train.name")


def remove_unregistered_checkpoints(run_dir: Location) -> list[str]:
    """Delete the ``checkpoint_*`` folders of ``run_dir`` Ray Train never registered: written by a
    worker after the last registration, when the driver was killed. Ray never resumes from them,
    and a fallback past a damaged checkpoint must not either. Only in a folder this project's own
    record says it wrote, with Ray Train's record of its checkpoints (``check_run_folder``, which
    raises otherwise). Returns the names removed."""
    check_run_folder(run_dir)
    registered = registered_checkpoints(run_dir)
    if registered is None:
        return []
    removed = []
    for folder in checkpoint_folders(run_dir):
        if folder.name not in registered:
            log.warning("%s: removing a checkpoint Ray Train never registered (left by a killed run)", folder)
            folder.delete()
            removed.append(folder.name)
    return removed


@ray.remote(max_retries=0)
def _write_probe(where: str) -> tuple[str, str]:
    """On the node Ray picked: write one small file into ``where`` through the run's filesystem and
    delete it. Returns (node address, "" or the error's first line)."""
    node = ray.util.get_node_ip_address()
    probe = output_location(where, "train.storage_path") / f".write-check-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"cpal-ray write check\n")
        probe.delete()
    except Exception as e:  # noqa: BLE001 - reported to the driver as one line
        return node, (f"{type(e).__name__}: {e}".strip().splitlines() or [""])[0]
    return node, ""


def check_storage_from_worker(cfg: Config, run_dir: Location) -> None:
    """Before the first epoch: write and delete one small file in ``run_dir`` from a node that a
    training worker would run on (a task with a worker's resources, outside any placement group).

    The driver and the bank run where the job was submitted (the head on a cluster, whose instance
    profile Ray sets up); the workers run on the GPU nodes, which may have no write access to the
    bucket at all. Without this check the first checkpoint upload of rank 0 fails after a paid
    epoch. Raises ConfigError naming the bucket (or folder) and the node."""
    d = cfg.dist
    opts = {"num_cpus": d.cpus_per_worker, "scheduling_strategy": "DEFAULT"}
    if d.use_gpu:
        opts["num_gpus"] = 1
    node, error = ray.get(_write_probe.options(**opts).remote(str(run_dir)))
    if error:
        where = f"bucket {urlsplit(run_dir.uri).netloc}" if "://" in run_dir.uri else f"folder {run_dir}"
        raise ConfigError(f"train.storage_path: a training worker on node {node} cannot write to {where} "
                          f"({run_dir}): {error}; give that node type write access (on AWS an instance profile "
                          "allowing s3:PutObject and s3:DeleteObject, see docs/cluster.md)")


def prepare_run_folder(cfg: Config, run_dir: Location) -> list[str]:
    """Before Ray Train starts: refuse a folder of foreign checkpoints (``check_run_folder``); for
    a run that has checkpoints, compare ``cfg`` with its saved ``config.yaml``
    (``engine.resume.check_resume``: a frozen field that differs is a ConfigError, with nothing
    written); remove unregistered checkpoints and the temporary files of killed writers; write
    ``RUN_RECORD`` and the config. Returns the changes of a resumed run (``["train.epochs 2 -> 6"]``)."""
    check_run_folder(run_dir)
    changes = []
    if checkpoint_folders(run_dir) and (run_dir / CONFIG_FILE).is_file():
        changes = check_resume(load_config(run_dir / CONFIG_FILE), cfg, str(run_dir))
        log.info("resuming %s; changed: %s", run_dir, ", ".join(changes) or "nothing")
    remove_unregistered_checkpoints(run_dir)
    for leftover in remove_temp_files(run_dir):
        log.info("removed %s, left by a writer killed mid-write", leftover)
    (run_dir / RUN_RECORD).write_text(json.dumps({"written_by": "cpal-ray", "name": run_dir.name}) + "\n")
    save_config(cfg, run_dir / CONFIG_FILE)
    return changes


def build_trainer(cfg: Config, *, bank_actors: list[str], storage: Location, name: str,
                  callbacks=None) -> InterruptibleTorchTrainer:
    d = cfg.dist
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    return InterruptibleTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "bank_actors": bank_actors, "run_dir": str(storage / name),
                           "progress_bar": interactive()},  # rank 0 draws a bar through Ray (tqdm_ray)
        scaling_config=ray.train.ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=name, storage_path=storage.path, storage_filesystem=storage.fs,
                                       failure_config=ray.train.FailureConfig(max_failures=d.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(
                                           num_to_keep=cfg.train.keep_checkpoints or None),
                                       callbacks=[*(callbacks or []), FailFast()]),
    )


def run_training(cfg: Config, *, callbacks=None, storage_path: str | None = None, name: str | None = None) -> TrainingResult:
    """Train with Ray Train (Ray must be initialised by the caller) and export the final artefacts.

    Bad inputs raise before Ray Train starts, with nothing written; a worker error of
    ``NOT_RETRYABLE`` is raised as itself (``ray.train.TrainingFailedError`` for the others)."""
    name = check_run_name(name or cfg.train.name, "train.name")
    if cfg.train.mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"train.mlflow_uri={cfg.train.mlflow_uri!r}: MLflow tracking needs `pip install mlflow`")
    storage = output_location(storage_path or cfg.train.storage_path, "train.storage_path")
    run_dir = storage / name
    cfg = check_training_inputs(cfg)
    prepare_run_folder(cfg, run_dir)
    check_storage_from_worker(cfg, run_dir)
    actor_names = bank_actor_names(name, cfg.cpal.bank_shards) if cfg.training.uses_bank else []
    actors, trainer = [], None
    try:
        # Keep the handles for the whole fit: a non-detached actor dies with its last handle.
        actors = create_bank_actors(cfg, actor_names) if actor_names else []
        trainer = build_trainer(cfg, bank_actors=actor_names, storage=storage, name=name, callbacks=callbacks)
        result = trainer.fit()
    except ray.train.ControllerError as e:
        if isinstance(e.controller_failure, NOT_RETRYABLE):
            raise e.controller_failure from None
        raise
    except (KeyboardInterrupt, SystemExit, ray.exceptions.RayActorError):
        if isinstance(sys.exc_info()[1], KeyboardInterrupt) or (trainer is not None and trainer.interrupted):
            raise interrupted(run_dir, cfg.training.epochs) from None  # Ctrl-C: say where it resumes
        raise
    finally:
        for actor_name in actor_names:
            remove_bank_actor(actor_name)
        del actors
    if trainer.interrupted:  # Ray's abort can also end fit() without an error
        raise interrupted(run_dir, cfg.training.epochs)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    history = history_records(result.metrics_dataframe)
    checkpoint = storage.join(relative_path(result.checkpoint.path, storage.path))
    final = export_final(checkpoint, run_dir / "final", history)
    return TrainingResult(run_dir=run_dir, final_dir=final, metrics=dict(result.metrics or {}), history=history,
                          checkpoint_dir=checkpoint)


def history_records(frame) -> list[dict]:
    """The per-epoch records of Ray Train's metrics table. A key that only some epochs report
    (``bank_at_start``, in an attempt's first epoch) is a column that pandas fills with NaN in the
    others: those cells are left out, so each record is what its epoch reported."""
    if frame is None:
        return []
    return [{k: v for k, v in row.items() if not (isinstance(v, float) and v != v)}
            for row in frame.to_dict("records")]


def export_final(checkpoint: Location, out: Location, history: list | None = None) -> Location:
    """Copy the deliverables of a checkpoint folder to ``out``: weights, config, full state, and
    ``summary.json`` / ``history.json``. Works across local folders and object stores. Every file
    is checked against the checkpoint's ``SHA256SUMS`` first, and the copy after: a damaged one
    raises ``CheckpointError`` naming it, never becomes the final model."""
    state = load_checkpoint(checkpoint)  # every file verified before anything is written
    files = verify_checkpoint(checkpoint)  # the bytes checked are the bytes written
    for name, data in files.items():
        (out / name).write_bytes(data)
    if (checkpoint / SUMS_FILE).is_file():
        (out / SUMS_FILE).write_bytes((checkpoint / SUMS_FILE).read_bytes())
    verify_checkpoint(out)
    summary = {"epochs_completed": state["epoch"], "global_step": state["global_step"],
               "context_version": context.version if (context := checkpoint_context(state)) else 0,
               "checkpoint": str(checkpoint), "metrics": state.get("metrics", {})}
    (out / "summary.json").write_text(strict_json(summary, indent=2))
    if history is not None:
        (out / "history.json").write_text(strict_json(history, indent=2))
    return out
