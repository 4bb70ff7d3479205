"""Ray Tune sweeps: each trial trains with Ray Train (its own bank actor) and reports seed mIoU.

One trial = ``run_training`` (a ``TorchTrainer`` with ``dist.num_workers`` workers, the bank actor
``cpal-bank-trial-<trial id>`` created and removed by ``run_training``) + a seed-mIoU evaluation
of the exported weights on the val split, run as a Ray task with one worker's resources (a GPU
when ``dist.use_gpu``). Training progress reaches Tune through ``TuneReportCallback``; the last
report of a trial is the evaluation (``seed_miou``, ``best_threshold``, ``wall_seconds``, ``iou``).

Experiment folder ``<storage>/<name>/`` (a local folder on shared storage or a URI, handed to Tune
as ``storage_path`` + ``storage_filesystem``; ``cpal_ray.storage``):
  sweep.json            the sweep as plain data (base config, space, rows, seeds, resources):
                        ``restore_sweep`` rebuilds the trainable from it
  <Tune's trial dirs>   Tune's own files (params.json, result.json, experiment state)
  trials/trial-<id>/    the trial's Ray Train run (checkpoints, final/), ``runs.log`` (one line per
                        start of the trial) and ``seeds.json`` (the evaluation)
  results.csv / results.md / best_config.yaml / heatmap_k_tau.png / bars.png  (``cpal_ray.sweeps.results``)

Resources: the trial function asks ``{"cpu": 0.01}`` (plus the bank actor's share, which runs in
the trial's placement group); its workers ask ``dist.cpus_per_worker`` each, outside it. Tune
cannot see the workers' needs, so trials at once = ``dist.max_concurrent_trials`` (set it on an
autoscaling cluster: what the cluster holds at its largest), else what the cluster holds when
the sweep starts (CPUs // CPUs per trial, GPUs // GPUs per trial). A cluster that holds no trial
yet (scaling from zero) and no setting is an error that says so, not a sweep of one trial at a time.

A trial survives a lost node: Tune retries it (``TRIAL_MAX_FAILURES`` times) and the retry's
``run_training`` resumes the trial's Ray Train run from its last checkpoint, bank included; a
restore resumes errored trials the same way. A point that failed for a reason retrying cannot fix
(``NOT_RETRYABLE``: an invalid value, bad data) is recorded in ``trials/trial-<id>/failed.json``,
and a retry or a restore raises that error again at once, without training (``--retry-errored``
runs it again).

Each trial's result is read from its final report (the row tagged ``phase == "final"`` in
``ResultGrid``'s per-trial metrics), whatever order Tune received the progress reports in.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.tune as tune
from ray.tune.integration.ray_train import TuneReportCallback

from cpal_ray.config import Config, ConfigError, from_dict
from cpal_ray.data import build_dataset
from cpal_ray.distributed.runtime import actor_device, output_location
from cpal_ray.distributed.trainer import run_training
from cpal_ray.engine import load_trained
from cpal_ray.engine.inputs import NOT_RETRYABLE
from cpal_ray.formatting import finite_or_none, strict_json
from cpal_ray.inference.diagnostics import contrast_report
from cpal_ray.inference.evaluate import evaluate_seeds
from cpal_ray.storage import Location, location
from cpal_ray.sweeps.results import SPEC_FILE, source_metrics, trial_records, write_results
from cpal_ray.sweeps.spaces import ROW_KEY, point_overrides, required_overrides, smoke_space, space_spec

log = logging.getLogger(__name__)
DRIVER_CPU = 0.01          # the trial function itself (0 is rejected by Tune)
TRIAL_MAX_FAILURES = 3     # Tune's retries of a failed trial (a lost node: it resumes from its checkpoint)
FAILED_FILE = "failed.json"


class PointFailedError(RuntimeError):
    """A point that failed before with an error retrying cannot fix, raised again without training."""
SEARCHES = ("grid", "random", "optuna")


class SweepProgressCallback(TuneReportCallback):
    """``TuneReportCallback`` whose training reports carry ``seed_miou = NaN``, scalars only.

    With ``TuneConfig(metric="seed_miou")`` Tune rejects a result without the metric; the NaN
    marks a training-progress report (``phase="train"``), and best-trial selection skips NaN.
    Per-rank lists (bank fill, pushes) stay in the run's own history.
    """

    def after_report(self, run_context, metrics, checkpoint):
        scalars = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str))}
        metrics = [{**scalars, "seed_miou": float("nan"), "phase": "train"}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


# ----------------------------------------------------------------------------- the sweep's spec


def _absolute(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if path and "://" not in path and not path.startswith("bundled:") and p.exists() else path


def _absolute_paths(cfg: Config) -> Config:
    """Trials run in their own working directory: make existing relative paths absolute."""
    fields = {"data.root": cfg.data.root, "data.cls_labels": cfg.data.cls_labels, "model.weights": cfg.model.weights}
    fields.update({k: v for k, v in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split))
                   if v.endswith(".txt")})  # a split is a name ("train_aug") or a path to an id list
    changed = {k: _absolute(v) for k, v in fields.items() if v and _absolute(v) != v}
    return cfg.replace(**changed) if changed else cfg


def _dotted(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in cfg.to_dict().items() for key, value in values.items()}


def build_spec(base_cfg: Config, space_module, experiment_dir: Location, *, seeds: int = 1, search: str = "grid",
               num_samples: int = 1, gpus_per_trial: int = 0, eval_max_images: int = 0, eval_split: str = "val",
               smoke_test: bool = False,
               max_concurrent: int | None = None) -> dict:
    """The sweep as plain data: base config (space minimums and GPU settings applied), space, rows."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if seeds < 1 or num_samples < 1:
        raise ValueError("seeds and num_samples must be >= 1")
    if search == "optuna" and seeds > 1:
        raise ValueError("--repeats > 1 repeats grid or random points; Optuna proposes each point once")
    spec = space_spec(space_module)
    cfg = _absolute_paths(base_cfg)
    raised = required_overrides(_dotted(cfg), spec["requires"])
    if raised:
        log.warning("space %s raises the base config to %s so every point is valid", spec["module"], raised)
        cfg = cfg.replace(**raised)
    if gpus_per_trial > 0:
        cfg = cfg.replace(**{"dist.use_gpu": True, "dist.num_workers": int(gpus_per_trial)})
    if smoke_test:
        spec["space"] = smoke_space(spec["space"])
        cfg = cfg.replace(**{"train.epochs": 1, "train.max_steps_per_epoch": 2, "inference.scales": [1.0]})
        eval_max_images = eval_max_images or 8
    if cfg.train.keep_checkpoints == 0:  # every trial's every epoch would stay: keep the newest 2
        cfg = cfg.replace(**{"train.keep_checkpoints": 2})
    base_seed = cfg.train.seed
    spec.update(base=cfg.to_dict(), raised=raised, seeds=[base_seed + i for i in range(seeds)], search=search,
                num_samples=num_samples if search != "grid" else 1, eval_max_images=eval_max_images,
                eval_split=eval_split,
                experiment_dir=str(experiment_dir), max_concurrent=max_concurrent or default_concurrency(cfg),
                resources={"trial": trial_resources(cfg), "workers": cfg.dist.num_workers,
                           "per_worker": {"CPU": cfg.dist.cpus_per_worker, "GPU": int(cfg.dist.use_gpu)}})
    return spec


def trial_resources(cfg: Config) -> dict[str, float]:
    """What the trial function holds: its own sliver of CPU plus the bank actor it owns."""
    shards = cfg.cpal.bank_shards
    res = {"cpu": DRIVER_CPU + cfg.dist.bank_cpus * shards}
    if cfg.dist.bank_gpus > 0:
        res["gpu"] = cfg.dist.bank_gpus * shards
    return res


def default_concurrency(cfg: Config, total: dict | None = None) -> int:
    """Trials at once: ``dist.max_concurrent_trials`` when set, else the trials that fit in the
    cluster now (``total``, default ``ray.cluster_resources()``): CPUs // CPUs per trial and
    GPUs // GPUs per trial. Raises ConfigError when none fits now (a cluster scaling from zero)."""
    d = cfg.dist
    if d.max_concurrent_trials > 0:
        return d.max_concurrent_trials
    total = ray.cluster_resources() if total is None else total
    shards = cfg.cpal.bank_shards
    n = total.get("CPU", 0.0) // (DRIVER_CPU + d.bank_cpus * shards + d.num_workers * d.cpus_per_worker)
    gpus = (d.num_workers if d.use_gpu else 0) + d.bank_gpus * shards
    if gpus > 0:
        n = min(n, total.get("GPU", 0.0) // gpus)
    if n < 1:
        raise ConfigError(f"dist.max_concurrent_trials: the cluster holds no trial now ({dict(total)}; one trial needs "
                          f"{d.num_workers} x {d.cpus_per_worker} CPU{f' + {gpus} GPU' if gpus else ''}): on a cluster "
                          "that scales from zero, set how many trials run at once (dist.max_concurrent_trials=N or "
                          "--max-concurrent N, e.g. the worker nodes it can start for one-node trials)")
    return int(n)


def tune_param_space(spec: dict) -> dict:
    """Lists -> ``tune.grid_search`` (grid) or ``tune.choice`` (random / optuna); seeds as a grid."""
    sample = tune.grid_search if spec["search"] == "grid" else tune.choice
    space = {k: sample(list(v)) for k, v in spec["space"].items()}
    if len(spec["seeds"]) > 1:
        space["train.seed"] = tune.grid_search(list(spec["seeds"]))
    return space


def _search_alg(spec: dict):
    if spec["search"] == "random":  # the same random point for every seed of a sample
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # A SearchGenerator ignores TuneConfig.max_concurrent_trials (Tune warns): limit it here.
        return BasicVariantGenerator(constant_grid_search=True, random_state=spec["seeds"][0],
                                     max_concurrent=spec["max_concurrent"])
    if spec["search"] == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:  # optional: not a dependency of cpal-ray
            raise ImportError("--search optuna needs `pip install optuna`")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    return None


# --------------------------------------------------------------------------------- the trial


@ray.remote
def _evaluate_remote(final_dir: str, cfg_dict: dict, max_images: int, split: str) -> dict:
    """Seed mIoU of the exported weights on ``split`` (a task: GPU when the run had one)."""
    cfg = from_dict(cfg_dict)
    device = actor_device()  # cuda only when this task was given a GPU (cfg.dist.use_gpu)
    model, _, context = load_trained(final_dir, cfg=cfg)
    dataset = build_dataset(cfg.data, split, train=False)
    seeds = evaluate_seeds(model.to(device), dataset, cfg, device=device, context=context, max_images=max_images,
                           cam_source=cfg.inference.cam_source)
    contrast = contrast_report(model, dataset, cfg.cpal, context, max_images=max_images, batch_size=1, device=device)
    return {**seeds, "map_metrics": source_metrics(seeds, contrast)}


def sweep_trial(config: dict, spec: dict) -> None:
    """The Tune trainable: train one point with Ray Train, evaluate its seeds, report."""
    start = time.time()
    trial_id = tune.get_context().get_trial_id()
    name = f"trial-{trial_id}"
    trials_dir = location(spec["experiment_dir"]) / "trials"
    run_dir = trials_dir / name
    runs_log = run_dir / "runs.log"  # one line per start: restore must not re-run finished trials
    seeds_file = run_dir / "seeds.json"
    # A trial stopped between its evaluation and Tune recording the report is started again by
    # a restore: report the evaluation it already made instead of training again.
    reuse = seeds_file.is_file()
    failed_file = run_dir / FAILED_FILE
    if failed_file.is_file() and spec.get("retry_errored"):
        failed_file.delete()
    failed = failed_file.is_file() and not reuse
    runs_log.write_text((runs_log.read_text() if runs_log.is_file() else "") + f"{time.strftime('%Y-%m-%dT%H:%M:%S')} "
                        f"{'reuse' if reuse else 'failed before' if failed else 'start'}\n")
    if failed:
        recorded = json.loads(failed_file.read_text())
        raise PointFailedError(f"{recorded['type']}: {recorded['error']} (this point failed before; "
                               "--retry-errored runs it again)")
    if reuse:
        seeds = json.loads(seeds_file.read_text())
        tune.report({k: v for k, v in seeds.items() if k != "curve"})
        return
    point = {k: config[k] for k in spec["space"]}
    seed = int(config.get("train.seed", spec["seeds"][0]))
    try:
        cfg = from_dict(spec["base"]).replace(**point_overrides(point, spec["rows"]), **{
            "train.seed": seed, "train.name": name, "train.storage_path": str(trials_dir)})
        # Optuna learns from a trial's last report: it then gets the evaluation only.
        progress = [SweepProgressCallback()] if spec["search"] != "optuna" else []
        result = run_training(cfg, callbacks=progress, storage_path=str(trials_dir), name=name)
    except NOT_RETRYABLE as e:
        failed_file.write_text(json.dumps({"type": type(e).__name__, "error": str(e)}))
        raise
    train_seconds = time.time() - start
    opts = {"num_cpus": cfg.dist.cpus_per_worker, "scheduling_strategy": "DEFAULT"}  # outside the trial's group
    if cfg.dist.use_gpu:
        opts["num_gpus"] = 1
    seeds = ray.get(_evaluate_remote.options(**opts).remote(str(result.final_dir), cfg.to_dict(),
                                                            spec["eval_max_images"],
                                                            spec.get("eval_split", "val")))
    metrics = {"seed_miou": float(seeds["best_miou"]), "best_threshold": float(seeds["best_threshold"]),
               "wall_seconds": time.time() - start, "train_seconds": train_seconds, "iou": finite_or_none(seeds["iou"]),
               "cam_source": seeds["cam_source"], "eval_images": seeds["images"], "phase": "final",
               "started_at": start, "finished_at": time.time(),
               "point": point.get(ROW_KEY) or json.dumps(point), **seeds["map_metrics"]}
    seeds_file.write_text(strict_json({**metrics, "curve": finite_or_none(seeds["miou"])}, indent=2))
    tune.report(metrics)


def make_trainable(spec: dict):
    cfg = from_dict(spec["base"])
    return tune.with_resources(tune.with_parameters(sweep_trial, spec=spec), trial_resources(cfg))


# ------------------------------------------------------------------------------ run / restore


@dataclass
class SweepOutcome:
    experiment_dir: Location
    result_grid: Any            # ray.tune.ResultGrid
    files: dict                 # what write_results wrote
    summary: dict               # trials / ok / errors / unfinished counts


def run_sweep(base_cfg: Config, space_module, experiment_dir, *, seeds: int = 1, search: str = "grid",
              num_samples: int = 1, gpus_per_trial: int = 0, max_concurrent: int | None = None,
              eval_max_images: int = 0, eval_split: str = "val", smoke_test: bool = False) -> SweepOutcome:
    """Run a sweep of ``space_module`` around ``base_cfg`` into ``experiment_dir`` (a local path
    or URI; Ray initialised)."""
    experiment_dir = output_location(str(experiment_dir), "--storage")
    if tune.Tuner.can_restore(experiment_dir.path, storage_filesystem=experiment_dir.fs):
        raise FileExistsError(f"{experiment_dir} already holds a sweep: restore it (--restore) or pick another name")
    spec = build_spec(base_cfg, space_module, experiment_dir, seeds=seeds, search=search, num_samples=num_samples,
                      gpus_per_trial=gpus_per_trial, eval_max_images=eval_max_images, eval_split=eval_split,
                      smoke_test=smoke_test,
                      max_concurrent=max_concurrent)
    (experiment_dir / SPEC_FILE).write_text(strict_json(spec, indent=2))
    search_alg = _search_alg(spec)
    tuner = tune.Tuner(
        make_trainable(spec),
        param_space=tune_param_space(spec),
        tune_config=tune.TuneConfig(metric="seed_miou", mode="max", search_alg=search_alg,
                                    num_samples=spec["num_samples"],
                                    max_concurrent_trials=None if search == "random" else spec["max_concurrent"]),
        run_config=tune.RunConfig(name=experiment_dir.name, storage_path=experiment_dir.parent.path,
                                  storage_filesystem=experiment_dir.fs,
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES,
                                                                    fail_fast=False)),
    )
    return _finish(tuner.fit(), experiment_dir, spec)


SWEEP_RECORD_KEYS = ("base", "space", "rows", "seeds", "search")


def read_sweep_record(experiment_dir: Location) -> dict:
    """This project's record of a sweep, ``sweep.json`` (written when the sweep starts), checked
    before Ray Tune is let near the folder: a restore unpickles the folder's ``tuner.pkl``, so a
    folder without a record of ours is refused (FileNotFoundError / ConfigError naming it)."""
    spec_file = experiment_dir / SPEC_FILE
    if not spec_file.is_file():
        raise FileNotFoundError(f"{experiment_dir}: not a cpal-ray sweep folder (no {SPEC_FILE}); not restored, "
                                "as restoring unpickles its tuner.pkl")
    try:
        spec = json.loads(spec_file.read_text())
        missing = [k for k in SWEEP_RECORD_KEYS if k not in spec] if isinstance(spec, dict) else list(SWEEP_RECORD_KEYS)
        if not missing:
            from_dict(spec["base"])
    except (ValueError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"{spec_file}: not a cpal-ray sweep record ({reason}); not restored") from None
    if missing:
        raise ConfigError(f"{spec_file}: not a cpal-ray sweep record (no {', '.join(missing)}); not restored, as "
                          "restoring unpickles the folder's tuner.pkl")
    return spec


def restore_sweep(path, *, retry_errored: bool = False) -> SweepOutcome:
    """Continue an interrupted sweep (a local path or URI): finished trials are kept as they are,
    unfinished and errored ones run again (a trial's Ray Train run resumes from its last
    checkpoint: a trial that lost its node goes on), except that a point recorded as failed for a
    reason retrying cannot fix fails again at once unless ``retry_errored`` (then it runs)."""
    experiment_dir = output_location(str(path), "--restore")
    spec = {**read_sweep_record(experiment_dir), "experiment_dir": str(experiment_dir),  # the folder may have moved
            "retry_errored": retry_errored}
    if not tune.Tuner.can_restore(experiment_dir.path, storage_filesystem=experiment_dir.fs):
        raise FileNotFoundError(f"{experiment_dir}: not a sweep folder (no Tune state)")
    tuner = tune.Tuner.restore(experiment_dir.path, trainable=make_trainable(spec), resume_unfinished=True,
                               resume_errored=True, storage_filesystem=experiment_dir.fs)
    return _finish(tuner.fit(), experiment_dir, spec)


def _finish(grid, experiment_dir: Location, spec: dict) -> SweepOutcome:
    files = write_results(grid, experiment_dir, spec)
    records = trial_records(grid, spec)
    summary = {s: sum(r["status"] == s for r in records) for s in ("ok", "error", "unfinished")}
    summary["trials"] = len(records)
    for r in records:
        if r["status"] == "error":
            log.error("trial %s (%s, seed %s) failed: %s", r["trial_id"], r["label"], r["seed"], r["error"])
    return SweepOutcome(experiment_dir=experiment_dir, result_grid=grid, files=files, summary=summary)
