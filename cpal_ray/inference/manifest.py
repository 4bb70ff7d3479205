"""The manifest of a Ray Data stage run, and the run spec that guards its output folder. No Ray.

Every per-image job (``cpal_ray.inference.image_jobs``) returns one *manifest row*: a small dict
of ``CAM_SCHEMA`` or ``LABEL_SCHEMA``, never an array. The driver writes the rows with
``ManifestWriter`` as parquet parts ``<out>/manifest/part-<run>-<seq>.parquet``;
``consolidate_manifest`` keeps the latest row per id (runs are ordered by their start time) in
``<out>/manifest.parquet``. ``check_run_spec`` saves what decides the output bytes as
``<out>/run_spec.json`` and refuses a folder made with other settings.
Every folder and file here is a ``cpal_ray.storage`` location: a local path or an ``s3://`` URI.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpal_ray.data.base import DataError
from cpal_ray.inference.io import PACAM_DIR, atomic_write_bytes
from cpal_ray.formatting import strict_json
from cpal_ray.storage import location, remove_temp_files

log = logging.getLogger(__name__)

_COMMON = [("id", pa.string()), ("status", pa.string()), ("path", pa.string()), ("classes", pa.list_(pa.int64())),
           ("height", pa.int64()), ("width", pa.int64()), ("seconds", pa.float64()), ("error", pa.string()),
           ("labels_source", pa.string())]
# status: "done" (written now), "skipped" (a valid file was already there), "failed" (see error);
# labels_source: the image-level label file the classes come from (filled in by ManifestWriter).
CAM_SCHEMA = pa.schema(_COMMON + [("pacam_path", pa.string())])
LABEL_SCHEMA = pa.schema(_COMMON + [("frac_ignored", pa.float64()), ("sha256", pa.string())])
MANIFEST_PARTS = "manifest"  # <out>/manifest/part-*.parquet (ManifestWriter)
MANIFEST_DIR, MANIFEST_FILE = MANIFEST_PARTS, "manifest.parquet"  # <out>/manifest/, <out>/manifest.parquet


def manifest_row(schema: pa.Schema, sample_id: str, **values) -> dict:
    """One manifest row of ``schema``: the given values, every other column None, no error."""
    row = {name: None for name in schema.names}
    row.update({"id": sample_id, "error": ""})
    row.update(values)
    return row


def failed_row(schema: pa.Schema, sample_id: str, error: BaseException | str, t0: float | None = None) -> dict:
    """A ``status="failed"`` row whose error names the id (and the exception type)."""
    msg = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    secs = time.perf_counter() - t0 if t0 is not None else 0.0
    return manifest_row(schema, sample_id, status="failed", error=f"id {sample_id}: {msg}", seconds=secs)



def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """The rows of one batch as a table of ``schema``."""
    return pa.Table.from_pylist(rows, schema=schema)


class ManifestWriter:
    """Driver side: collects row tables, counts statuses, writes parquet parts atomically.

    Args:
        folder: ``<out>/manifest``; parts are ``part-<run>-<seq>.parquet`` (run = start time in ns,
            so parts sort in run order). flush_rows: rows per part.
        keep_errors: how many failures are kept in memory for the report (all are in the parts).
        labels_source: written into every row's ``labels_source`` (``cpal_ray.data.labels_source``).
    """

    def __init__(self, folder, schema: pa.Schema, flush_rows: int = 256, keep_errors: int = 100,
                 labels_source: str = ""):
        self.folder = location(folder)
        self.schema = schema
        self.labels_source = labels_source
        self.flush_rows = int(flush_rows)
        self.keep_errors = keep_errors
        self.run = f"{time.time_ns():020d}"
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.failures: list[tuple[str, str]] = []
        self._buf: list[pa.Table] = []
        self._n_buf = 0
        self._seq = 0

    @property
    def seen(self) -> int:
        return sum(self.counts.values())

    def add(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        table = table.set_column(self.schema.get_field_index("labels_source"), "labels_source",
                                 pa.array([self.labels_source] * table.num_rows, pa.string()))
        for status, sid, err in zip(*(table.column(c).to_pylist() for c in ("status", "id", "error"))):
            self.counts[status] = self.counts.get(status, 0) + 1
            if status == "failed" and len(self.failures) < self.keep_errors:
                self.failures.append((sid, err))
        self._buf.append(table)
        self._n_buf += table.num_rows
        if self._n_buf >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._n_buf:
            return
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(self._buf), buf)
        atomic_write_bytes(self.folder / f"part-{self.run}-{self._seq:05d}.parquet", buf.getvalue())
        self._seq += 1
        self._buf, self._n_buf = [], 0


def manifest_ids(cam_dir) -> list[str] | None:
    """The ids the ``manifest.parquet`` of a pipeline's output folder lists (for a ``pacam/``
    folder, its parent's), sorted; None when there is no manifest (a folder made by hand)."""
    folder = location(cam_dir)
    for candidate in (folder, folder.parent) if folder.name == PACAM_DIR else (folder,):
        path = candidate / "manifest.parquet"
        if path.is_file():
            try:
                table = pq.read_table(io.BytesIO(path.read_bytes()), columns=["id"])
            except (OSError, ValueError, pa.ArrowException) as e:
                raise DataError(f"{path}: unreadable manifest ({e})") from None
            return sorted(table.column("id").to_pylist())
    return None


def consolidate_manifest(folder, out_path, schema: pa.Schema) -> pa.Table:
    """Merge the parts of ``folder`` into ``out_path``: the latest row per id, sorted by id.

    Unreadable parts (a run killed while writing one cannot leave one, but a copy might) are
    skipped with a warning. Returns the table written.
    """
    tables = []
    parts = [p for p in location(folder).list(".parquet") if p.name.startswith("part-")]
    for i, part in enumerate(parts):
        try:
            t = pq.read_table(io.BytesIO(part.read_bytes()))
            for name in (n for n in schema.names if n not in t.column_names):  # a part of an older version
                t = t.append_column(schema.field(name), pa.nulls(t.num_rows, schema.field(name).type))
            t = t.select(schema.names).cast(schema)
        except Exception as e:  # noqa: BLE001 - a damaged part must not lose the others
            log.warning("%s: skipping unreadable manifest part (%s)", part, e)
            continue
        tables.append(t.append_column("__order", pa.array(np.arange(t.num_rows) + i * 2**32, pa.int64())))
    table = pa.concat_tables(tables) if tables else schema.empty_table().append_column("__order", pa.array([], pa.int64()))
    latest = table.group_by("id").aggregate([("__order", "max")]).column("__order_max")
    table = table.filter(pc.is_in(table.column("__order"), value_set=latest))
    table = table.drop_columns(["__order"]).sort_by("id")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(out_path, buf.getvalue())
    return table


def check_run_spec(out_dir, spec: dict, overwrite: bool = False, *, write: bool = True) -> None:
    """Refuse to resume into ``out_dir`` when it holds outputs made with other settings.

    ``spec`` (JSON-able) is what decides the output bytes. It is saved as ``<out>/run_spec.json``
    (unless ``write`` is False: the workflows check before Ray starts, and write later); a
    different saved spec raises ``DataError`` (a ValueError) naming the keys that differ, unless
    ``overwrite``. A spec with a ``checkpoint`` carries its content hash (``checkpoint_sha256``,
    added by ``distributed.stage_inputs.with_checkpoint_digest``: a model retrained into the same
    folder is another input); a ``cam_dir`` is recorded with its own run spec's sha256. An accepted folder that is written is then cleared of the temporary files of writers
    killed mid-write.
    """
    path = location(out_dir) / "run_spec.json"
    spec = json.loads(strict_json(spec))
    if spec.get("cam_dir") and (cams_spec := location(spec["cam_dir"]) / "run_spec.json").is_file():
        spec["cam_dir_spec_sha256"] = hashlib.sha256(cams_spec.read_bytes()).hexdigest()
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            raise DataError(f"{out_dir}: holds outputs made with other settings ({', '.join(diff)}: "
                            f"{[old.get(k) for k in diff]} -> {[spec.get(k) for k in diff]}); "
                            "use another output folder, or --overwrite to redo every file")
    if write:
        atomic_write_bytes(path, strict_json(spec, indent=2, sort_keys=True).encode())
        for leftover in remove_temp_files(out_dir):
            log.info("removed %s, left by a writer killed mid-write", leftover)


_RECORDED: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {}


def recorded_sha256(out_dir) -> dict[str, str]:
    """{id: sha256} of the PNGs the manifest parts of ``out_dir`` record (the latest row with a
    sha256 per id; parts sort in run order). Read again whenever the parts change."""
    parts = [p for p in (location(out_dir) / MANIFEST_PARTS).list(".parquet") if p.name.startswith("part-")]
    key, names = str(location(out_dir)), tuple(p.name for p in parts)
    if key in _RECORDED and _RECORDED[key][0] == names:
        return _RECORDED[key][1]
    sums = {}
    for part in parts:
        try:
            table = pq.read_table(io.BytesIO(part.read_bytes()), columns=["id", "sha256"])
        except Exception as e:  # noqa: BLE001 - a damaged part records nothing
            log.warning("%s: unreadable manifest part (%s)", part, e)
            continue
        sums.update((sid, sha) for sid, sha in zip(*(table.column(c).to_pylist() for c in ("id", "sha256"))) if sha)
    _RECORDED[key] = (names, sums)
    return sums

