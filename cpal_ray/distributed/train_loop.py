"""The Ray Train worker: ``engine.fit`` with the few Ray calls around it, numbered.

Every rank runs the same ``fit`` as a local run, with the task's hooks (``engine.tasks.task_hooks``)
given the bank actor behind a ``BankClient``, DDP from ``prepare_model`` and checkpoints handed to
``ray.train.report`` (rank 0 writes the folder, the other ranks report metrics only: ``report`` is
a barrier). On a (re)start CPAL's hook restores the bank actor from the checkpoint's bank state
(rank 0), or empties it, so a restarted run continues from exactly the saved bank. The checkpoint
is the one Ray Train hands out (the last it registered) when it verifies, else the newest older one of the run folder that
does (``resume_state``; each one skipped is logged with the reason).
"""
from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time

import ray
import ray.train
import ray.train.torch

from cpal_ray.config import from_dict
from cpal_ray.distributed.bank_actor import NAMESPACE, BankClient
from cpal_ray.distributed.interrupt import SNAPSHOT_FILE
from cpal_ray.engine import Hook, fit, load_first_valid, task_hooks, write_checkpoint
from cpal_ray.engine.comm import all_gather_object, barrier
from cpal_ray.engine.progress import WORKER_LINE, set_bar_factory, shorten_log_lines
from cpal_ray.engine.tracking import MlflowHook
from cpal_ray.storage import location

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders: checkpoint_<date and time>


class FaultHook(Hook):
    """Test-only fault injection (the ``faults`` config section), once per run (a marker file in the
    run folder remembers): at global step ``faults.at_step`` rank ``faults.kill_rank`` exits
    (``faults.target = worker``), or rank 0 kills the bank actor (``target = bank``; shard 0 of a
    sharded bank). With ``faults.wait_s > 0`` a worker does not exit by itself: it writes ``pid <pid>``
    into the marker and waits that long to be killed from outside (a test's SIGKILL by PID, as when
    a node dies)."""

    def __init__(self, faults, bank_actor, run_dir: str):
        self.f, self.bank_actor = faults, bank_actor
        self.marker = location(run_dir) / f".fault_{faults.target}_done"

    def after_step(self, state, step: int, outputs: dict | None = None) -> None:
        f = self.f
        target_rank = 0 if f.target == "bank" else f.kill_rank
        if state.epoch * state.steps_per_epoch + step != f.at_step or state.rank != target_rank:
            return
        if self.marker.exists():
            return
        self._wait_for_registered_checkpoint()  # before the marker: a test kills from outside on seeing it
        self.marker.write_text(f"pid {os.getpid()} epoch {state.epoch} step {step}\n")
        if f.target == "bank":
            log.warning("fault injection: killing the bank actor at global step %d", f.at_step)
            ray.kill(self.bank_actor, no_restart=False)
            return
        if f.wait_s > 0:
            log.warning("fault injection: rank %d (pid %d) waits to be killed at global step %d", state.rank,
                        os.getpid(), f.at_step)
            time.sleep(f.wait_s)
            raise RuntimeError(f"fault injection: rank {state.rank} was not killed within {f.wait_s}s")
        log.warning("fault injection: killing rank %d at global step %d", state.rank, f.at_step)
        os._exit(1)

    def _wait_for_registered_checkpoint(self, timeout_s: float = 60.0) -> None:
        """The faults the tests inject strike after the newest checkpoint is on Ray Train's record
        (its controller registers a reported checkpoint a poll later): wait, bounded, until the
        newest ``checkpoint_*`` folder of the run is named in Ray's snapshot."""
        run = self.marker.parent
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            newest = max((d.name for d in run.dirs() if d.name.startswith(CHECKPOINT_PREFIX)), default=None)
            snapshot = run / SNAPSHOT_FILE
            if newest is None or (snapshot.is_file() and newest in snapshot.read_text()):
                return
            time.sleep(0.1)


class NodeHook(Hook):
    """Adds ``node_ids`` (the Ray node of every rank) to each epoch's record."""

    def after_epoch(self, state, record: dict) -> None:
        record["node_ids"] = all_gather_object(ray.get_runtime_context().get_node_id())


def report(checkpoint: dict | None, record: dict) -> None:
    """``save_fn`` of ``fit``: rank 0 reports its checkpoint folder with the metrics, others the metrics."""
    if checkpoint is None:
        ray.train.report(record)
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, checkpoint)
        ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # (4) report


def resume_state(run_dir: str) -> dict | None:
    """The checkpoint state this (re)start resumes from, or None for a fresh run.

    Ray Train hands out the last checkpoint it registered; when that one does not verify (a
    truncated or damaged copy), the newest older ``checkpoint_*`` folder of the run that does is
    used (``engine.load_first_valid`` logs each one skipped and why; none usable raises
    ``CheckpointError``, which is not retried)."""
    checkpoint = ray.train.get_checkpoint()  # (2) resume from the last registered checkpoint
    if checkpoint is None:
        return None
    run = location(run_dir)
    name = posixpath.basename(checkpoint.path.rstrip("/"))
    older = sorted((d for d in run.dirs() if d.name.startswith(CHECKPOINT_PREFIX) and d.name < name),
                   key=lambda d: d.name, reverse=True)
    state, folder = load_first_valid([run / name, *older])
    if folder.name != name:
        log.warning("resuming from %s (epoch %d) instead of the registered %s, which does not verify", folder,
                    state["epoch"], name)
    return state


def report_progress(rank: int, progress_bar: bool) -> None:
    """What a worker reports as it trains: rank 0 alone (``engine.progress``), through Ray's
    ``tqdm_ray`` (drawn by the driver) when the driver's terminal is interactive, no bar otherwise;
    and no log line of this worker longer than ``engine.progress.MAX_LINE`` characters (Ray Train
    logs every report's whole metrics at INFO)."""
    if rank == 0 and progress_bar:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        set_bar_factory(lambda iterable, desc, total: ray_tqdm(iterable, desc=desc, total=total))
    else:
        set_bar_factory(lambda iterable, desc, total: None)
    shorten_log_lines("", "ray", limit=WORKER_LINE)


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()  # (1) who am I
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    report_progress(rank, config.get("progress_bar", False))
    actors = [ray.get_actor(n, namespace=NAMESPACE) for n in config.get("bank_actors", [])]

    def bank_client() -> BankClient | None:  # CPAL's bank, for the CAM network's hook (None: no actors)
        return BankClient(actors, cfg.dist.max_pushes_in_flight, rank=rank, barrier=barrier,
                          push_every=cfg.dist.bank_push_every, num_classes=cfg.bank_classes) if actors else None

    resume = resume_state(config["run_dir"])
    hooks = [NodeHook(), *([FaultHook(cfg.faults, actors[0] if actors else None, config["run_dir"])]
                           if cfg.faults.enabled else [])]
    if cfg.train.mlflow_uri:  # Ray's MLflow integration: a run on rank 0, a no-op client elsewhere
        from ray.air.integrations.mlflow import setup_mlflow

        client = setup_mlflow(config=cfg.to_dict(), tracking_uri=cfg.train.mlflow_uri,
                              experiment_name=cfg.train.name, create_experiment_if_not_exists=True)
        hooks.append(MlflowHook(client))
    fit(cfg, device=ray.train.torch.get_device(), rank=rank, world_size=world,
        prepare_model=ray.train.torch.prepare_model,  # (3) DDP (gloo on CPU, nccl on GPU), on the device
        save_fn=report, resume=resume, hooks=[*task_hooks(cfg, bank_client), *hooks], run_dir=config["run_dir"])
