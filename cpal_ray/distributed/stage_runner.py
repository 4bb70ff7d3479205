"""The one runner of every Ray Data stage (CAMs, CRF labels, masks, predictions), streaming.

    ids ─► step 1 actor pool ─► step 2 actor pool ─► …  (each: ``ActorResources`` of its section)
    rows ─► driver: ``ManifestWriter`` parquet parts in <out>/manifest/ ─► <out>/manifest.parquet

A stage is a ``StageSpec``: the inputs checked before Ray (``stage_inputs.StageInputs``), the run spec that
decides the output bytes, and one or more ``StageStep`` (an ``ImageStage`` actor class, its
arguments and its resources). ``run_stage`` checks the run spec, saves the config, writes a failed
row for every id the reader left out, maps the steps over the ids and writes the manifest; the
driver sees nothing but small rows, so its memory does not grow with the dataset.

Resources come from the config, never from what the cluster holds when the run starts: every
pool is elastic (one actor, growing while work waits, up to ``max_actors``, 0 = no limit), so on
a cluster that scales from zero it grows as the autoscaler adds nodes. An actor takes a GPU share
only when its section asks for one, and uses ``cuda`` only when Ray granted it (``actor_device``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy

from cpal_ray.config import Config, save_config
from cpal_ray.data import build_dataset
from cpal_ray.distributed.runtime import actor_device
from cpal_ray.distributed.stage_inputs import StageInputs
from cpal_ray.inference.manifest import (MANIFEST_DIR, MANIFEST_FILE, ManifestWriter, check_run_spec,
                                         consolidate_manifest, failed_row, rows_to_table)
from cpal_ray.storage import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorResources:
    """One actor pool's resources, the same shape in every stage section of the config.

    cpus: CPUs per actor; gpus: the share of one GPU per actor (0 = a CPU actor); max_actors: the
    most actors (0 = grow with the cluster)."""
    cpus: float
    gpus: float = 0.0
    max_actors: int = 0

    @classmethod
    def of(cls, section) -> "ActorResources":
        """From a stage section of the config (``inference``, ``pseudo``, ``affinity``, ``seg``)."""
        return cls(section.actor_cpus, section.actor_gpus, section.max_actors)

    def ray_options(self) -> dict:
        """``map_batches`` keywords: an elastic pool and each actor's CPUs (and GPU share)."""
        return {"compute": ActorPoolStrategy(min_size=1, max_size=self.max_actors or None), "num_cpus": self.cpus,
                **({"num_gpus": self.gpus} if self.gpus else {})}


@dataclass(frozen=True)
class StageStep:
    """One actor pool of a stage: ``actor(**kwargs)`` maps batches of ids (or of the previous
    step's rows) to manifest rows."""
    actor: type
    kwargs: dict
    resources: ActorResources


@dataclass
class StageSpec:
    """A whole Ray Data stage run: its name (for the logs), output folder, checked inputs, the
    manifest's schema, the run spec saved as ``run_spec.json``, and its steps in order."""
    name: str
    out_dir: Location
    inputs: StageInputs
    schema: pa.Schema
    run_spec: dict
    steps: list[StageStep] = field(default_factory=list)
    overwrite: bool = False
    rows_per_block: int = 4


@dataclass
class RunSummary:
    """What a stage run did. counts: {"done", "skipped", "failed"}; failures: (id, error), first 100."""
    out_dir: Location
    manifest: Location
    total: int
    counts: dict
    failures: list
    seconds: float

    @property
    def ok(self) -> bool:
        return self.counts.get("failed", 0) == 0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "manifest": str(self.manifest), "total": self.total,
                **self.counts, "seconds": round(self.seconds, 2), "failures": [list(f) for f in self.failures]}


def column(batch, name: str) -> list | None:
    """Column ``name`` of a batch (pyarrow Table or dict of numpy arrays) as a list, or None."""
    if isinstance(batch, pa.Table):
        return batch.column(name).to_pylist() if name in batch.column_names else None
    return [x.item() if hasattr(x, "item") else x for x in batch[name]] if name in batch else None


class ImageStage:
    """The base of every stage's actor: the dataset built once per actor, id -> index, the device
    (``cuda`` only when Ray granted this actor a GPU) and the crash knob.

    A subclass sets ``schema`` and defines ``job(index) -> row``; ``__call__`` maps it over the ids
    of a batch (an id the worker's dataset lacks gives a failed row). ``dataset``: a dataset to use
    instead of ``split`` of ``cfg.data`` (a folder of the user's photos).
    """
    schema: pa.Schema

    def __init__(self, cfg: Config, split: str, crash_after: int, dataset=None):
        self.device = actor_device()
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data, split, train=False)
        self.index = {sid: i for i, sid in enumerate(self.dataset.ids)}
        self.crash_after = int(crash_after)
        self.calls = 0

    def _tick(self) -> None:
        if 0 <= self.crash_after <= self.calls:
            raise RuntimeError(f"crash_after={self.crash_after} reached (test knob: a simulated crash)")
        self.calls += 1

    def job(self, index: int) -> dict:
        raise NotImplementedError

    def row(self, sid: str, batch_row: dict) -> dict:
        """The row of one id; ``batch_row``: the previous step's row (empty for the first step)."""
        if sid not in self.index:
            return failed_row(self.schema, sid, "not in the dataset read by this worker")
        return self.job(self.index[sid])

    def __call__(self, batch) -> pa.Table:
        ids = list(map(str, column(batch, "id")))
        extra = {name: column(batch, name) for name in ("status", "error")}
        rows = []
        for i, sid in enumerate(ids):
            self._tick()
            rows.append(self.row(sid, {k: v[i] for k, v in extra.items() if v is not None}))
        return rows_to_table(rows, self.schema)


def _id_dataset(ids: list[str], rows_per_block: int):
    n_blocks = max(1, min(len(ids), math.ceil(len(ids) / max(1, rows_per_block))))
    return ray.data.from_items([{"id": sid} for sid in ids], override_num_blocks=n_blocks)


def _drain(ds, writer: ManifestWriter, total: int, name: str, progress_every: float = 10.0) -> None:
    """Pull the row blocks to the driver, one at a time, into the manifest; log counts."""
    last = time.monotonic()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(batch)
            if time.monotonic() - last >= progress_every:
                log.info("%s: %d/%d %s", name, writer.seen, total, writer.counts)
                last = time.monotonic()
    finally:
        writer.flush()


def run_stage(spec: StageSpec) -> RunSummary:
    """Run one stage: refuse a folder made with other settings (``check_run_spec``), save the
    config, write a failed row per rejected id, map the steps over the ids, consolidate the
    manifest into ``<out>/manifest.parquet``. Ray must be initialised."""
    t0, out_dir, inputs, schema = time.monotonic(), spec.out_dir, spec.inputs, spec.schema
    check_run_spec(out_dir, spec.run_spec, spec.overwrite)
    save_config(inputs.cfg, out_dir / "config.yaml")
    writer = ManifestWriter(out_dir / MANIFEST_DIR, schema, labels_source=inputs.labels_source)
    writer.add(rows_to_table([failed_row(schema, sid, why) for sid, why in inputs.rejected], schema))
    total = len(inputs.ids) + len(inputs.rejected)
    if inputs.ids:
        ds = _id_dataset(inputs.ids, spec.rows_per_block)
        for step in spec.steps:
            ds = ds.map_batches(step.actor, fn_constructor_kwargs=step.kwargs, batch_size=1, batch_format="pyarrow",
                                **step.resources.ray_options())
        _drain(ds, writer, total, spec.name)
    manifest = out_dir / MANIFEST_FILE
    consolidate_manifest(out_dir / MANIFEST_DIR, manifest, schema)
    summary = RunSummary(out_dir, manifest, total, dict(writer.counts), list(writer.failures), time.monotonic() - t0)
    log.info("%s: %d ids: %s in %.1fs; manifest %s", spec.name, total, summary.counts, summary.seconds, manifest)
    for _, err in summary.failures[:20]:
        log.warning("%s failed: %s", spec.name, err)
    return summary
