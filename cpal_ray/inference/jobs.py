"""Per-image jobs of the batch runs (CAM files, pseudo-label PNGs) and their manifests. No Ray.

Each job takes one dataset index, writes one output file atomically and returns one *manifest
row*: a small dict, never an array. A job never raises for a bad input: a missing or corrupt
image, a corrupt CAM file or CAMs of the wrong classes give a row with ``status="failed"`` and
an ``error`` that starts with the id. The Ray Data stages in ``cpal_ray.distributed.pipelines``
map these jobs over a dataset; tests and small runs can call them directly.

Resuming: with ``skip_existing`` a job first validates the output it would write. A valid one
(decodes, right size, only allowed values, complete file) gives ``status="skipped"``; anything
else is redone. Outputs are deterministic, so a resumed run ends with the same bytes.

Rows (``CAM_SCHEMA`` / ``LABEL_SCHEMA``) are written by the driver with ``ManifestWriter`` as
parquet parts ``<out>/manifest/part-<run>-<seq>.parquet``; ``consolidate_manifest`` keeps the
latest row per id (runs are ordered by their start time) in ``<out>/manifest.parquet``.
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

from cpal_ray.data.files import DataError, open_image, read_rgb as read_image_file
from cpal_ray.data.classes import positive_classes
from cpal_ray.inference.io import LabelFileError, atomic_write_bytes, encode_label_png, load_cams_npz, \
    load_label_png, save_cams_npz
from cpal_ray.storage import Location, location, remove_temp_files
from cpal_ray.inference.pseudo import IGNORE, pseudo_label_from_config
from cpal_ray.numbers import strict_json

log = logging.getLogger(__name__)

_COMMON = [("id", pa.string()), ("status", pa.string()), ("path", pa.string()), ("classes", pa.list_(pa.int64())),
           ("height", pa.int64()), ("width", pa.int64()), ("seconds", pa.float64()), ("error", pa.string()),
           ("labels_source", pa.string())]
# status: "done" (written now), "skipped" (a valid file was already there), "failed" (see error);
# labels_source: the image-level label file the classes come from (filled in by ManifestWriter).
CAM_SCHEMA = pa.schema(_COMMON + [("pacam_path", pa.string())])
LABEL_SCHEMA = pa.schema(_COMMON + [("frac_ignored", pa.float64()), ("sha256", pa.string())])
PNG_END = b"IEND\xaeB`\x82"
MANIFEST_PARTS = "manifest"  # <out>/manifest/part-*.parquet (ManifestWriter)


PACAM_DIR = "pacam"  # the PACAM files of a CAM folder live in this subfolder


def source_dir(cam_dir, source: str = "cam") -> Location:
    """The folder of one map's files: ``<cam_dir>`` for the CAM, ``<cam_dir>/pacam`` for the PACAM."""
    return location(cam_dir) / PACAM_DIR if source == "pacam" else location(cam_dir)


def cam_path(cam_dir, sample_id: str, source: str = "cam") -> Location:
    """``<cam_dir>/<id>.npz`` for the CAM, ``<cam_dir>/pacam/<id>.npz`` for the PACAM."""
    return source_dir(cam_dir, source) / f"{sample_id}.npz"


def image_hw(dataset, index: int) -> tuple[int, int]:
    """(H, W) of image ``index``: read from the file header when the dataset has files, else decoded."""
    if hasattr(dataset, "image_size"):
        return dataset.image_size(index)
    if hasattr(dataset, "image_path"):
        sid = dataset.ids[index]
        path = dataset.image_path(sid)
        try:
            with open_image(path, path, "image", sid) as im:
                return im.size[1], im.size[0]
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(f"{path}: cannot read image header (id {sid}): {e}") from e
    return tuple(dataset.read(index)[0].shape[:2])


def read_rgb(dataset, index: int) -> np.ndarray:
    """uint8 (H, W, 3) photo of item ``index`` without normalising (and without the mask for file sets)."""
    if hasattr(dataset, "read_image"):
        return dataset.read_image(index)
    if hasattr(dataset, "image_path"):
        sid = dataset.ids[index]
        return read_image_file(dataset.image_path(sid), sid)
    return dataset.read(index)[0]


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


def validate_label_png(path, hw: tuple[int, int], classes: np.ndarray) -> tuple[np.ndarray, str]:
    """Check a finished pseudo-label: a complete PNG (signature .. IEND), decodes, shape ``hw``,
    values in {0, classes + 1, 255}. Returns (label (H, W) uint8, sha256 of the bytes);
    raises ``LabelFileError`` naming the path otherwise (missing, truncated, wrong size/values)."""
    path = location(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LabelFileError(f"{path}: cannot read ({e})") from e
    if not (data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(PNG_END)):
        raise LabelFileError(f"{path}: incomplete PNG ({len(data)} bytes)")
    label = load_label_png(path, expected_shape=tuple(hw))
    allowed = np.concatenate([[0, IGNORE], np.asarray(classes, dtype=np.int64) + 1])
    bad = np.setdiff1d(np.unique(label), allowed)
    if bad.size:
        raise LabelFileError(f"{path}: values {bad.tolist()} outside {sorted(allowed.tolist())}")
    return label, hashlib.sha256(data).hexdigest()


def existing_label(png, hw: tuple[int, int], classes, recorded: str | None = None
                   ) -> tuple[np.ndarray | None, str | None]:
    """(label, sha256) of a finished PNG that ``validate_label_png`` accepts and whose sha256 is
    ``recorded`` (the manifest's, when it has one), else (None, None): the file is missing or is
    redone (logged with the reason)."""
    if not png.exists():
        return None, None
    try:
        label, sha = validate_label_png(png, hw, classes)
    except LabelFileError as e:
        log.info("redoing %s: %s", png, e)
        return None, None
    if recorded and sha != recorded:
        log.info("redoing %s: its sha256 is not the one its manifest row records", png)
        return None, None
    return label, sha


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


def write_label_png(png, label: np.ndarray) -> str:
    """Write ``label`` as a palette PNG (atomically); returns the sha256 of its bytes."""
    data = encode_label_png(label)
    png.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_image_cams(cam_dir, sample_id: str, classes: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(classes, cams) of ``<cam_dir>/<id>.npz``, which must hold exactly ``classes`` at size ``hw``
    (ValueError naming the file otherwise)."""
    cam_file = cam_path(cam_dir, sample_id)
    cam_classes, cams = load_cams_npz(cam_file, expected_classes=classes)
    if cams.shape[1:] != tuple(hw):
        raise ValueError(f"{cam_file}: CAM size {cams.shape[1:]} != image size {tuple(hw)}")
    return cam_classes, cams


def cams_valid(paths: list[Location], classes: np.ndarray, hw: tuple[int, int]) -> bool:
    """True when every file loads with exactly ``classes`` and CAMs of size ``hw``."""
    try:
        return all(load_cams_npz(p, expected_classes=classes)[1].shape[1:] == tuple(hw) for p in paths)
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------- the jobs


def cam_job(model, dataset, index: int, out_dir, *, sources=("cam",), scales=(1.0,), flip: bool = True,
            save_dtype: str = "float16", context=None, cpal_cfg=None, skip_existing: bool = True,
            label_dir=None) -> dict:
    """Multi-scale CAMs of item ``index`` -> ``cam_path(out_dir, id, source)`` per source; a CAM_SCHEMA row.

    sources: subset of ("cam", "pacam"); "pacam" needs ``context`` (engine ``Context``, on the
    model's device) and ``cpal_cfg``. label_dir: skip when ``<label_dir>/<id>.png`` is already
    a valid pseudo-label (the on-the-fly pseudo-label run).
    """
    from cpal_ray.inference.multiscale import multiscale_cams

    t0 = time.perf_counter()
    sid = dataset.ids[index]
    paths = [cam_path(out_dir, sid, s) for s in sources]
    named = {s: str(p) for s, p in zip(sources, paths)}
    try:
        classes = positive_classes(dataset.label_of(index))
        hw = image_hw(dataset, index)
        done = dict(classes=classes.tolist(), height=hw[0], width=hw[1],
                    path=named.get("cam", ""), pacam_path=named.get("pacam", ""))
        if skip_existing and label_dir is not None:
            try:
                validate_label_png(location(label_dir) / f"{sid}.png", hw, classes)
                return manifest_row(CAM_SCHEMA, sid, status="skipped", seconds=time.perf_counter() - t0, **done)
            except LabelFileError:
                pass
        if skip_existing and cams_valid(paths, classes, hw):
            return manifest_row(CAM_SCHEMA, sid, status="skipped", seconds=time.perf_counter() - t0, **done)
        item = dataset[index]
        res = multiscale_cams(model, item["image"], item["label"], scales=tuple(scales), flip=flip,
                              context=context.prototypes if context is not None else None,
                              counts=context.counts if context is not None else None, cpal_cfg=cpal_cfg)
        for source, path in zip(sources, paths):
            save_cams_npz(path, res["classes"], res[source], dtype=save_dtype)
        return manifest_row(CAM_SCHEMA, sid, status="done", seconds=time.perf_counter() - t0, **done)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(CAM_SCHEMA, sid, e, t0)


def label_job(dataset, index: int, out_dir, make_label, *, image_labels: bool = True,
              skip_existing: bool = True) -> dict:
    """What every job writing one label PNG per image does: ``<out_dir>/<id>.png`` is kept when it
    already validates (size, classes), else ``make_label(classes, hw)`` -> (H, W) uint8 is written
    atomically. Returns a LABEL_SCHEMA row (``skipped`` / ``done``; any exception: ``failed``,
    naming the id).

    image_labels: the PNG may hold only the image's positive classes, which the row lists; without
    (predictions of a segmenter) any class, and the row lists the foreground classes it holds.
    """
    t0 = time.perf_counter()
    sid = dataset.ids[index]
    png = location(out_dir) / f"{sid}.png"
    try:
        classes = positive_classes(dataset.label_of(index)) if image_labels else np.arange(dataset.num_classes)
        hw = image_hw(dataset, index)
        label, sha = existing_label(png, hw, classes, recorded_sha256(out_dir).get(sid)) if skip_existing \
            else (None, None)
        status = "skipped"
        if label is None:
            status, label = "done", make_label(classes, hw)
            sha = write_label_png(png, label)
        listed = classes.tolist() if image_labels else [int(c) - 1 for c in np.unique(label) if 0 < c < IGNORE]
        return manifest_row(LABEL_SCHEMA, sid, status=status, path=str(png), classes=listed, height=hw[0],
                            width=hw[1], frac_ignored=float(np.mean(label == IGNORE)), sha256=sha,
                            seconds=time.perf_counter() - t0)
    except Exception as e:  # one bad image must not stop the run: reported in the row
        return failed_row(LABEL_SCHEMA, sid, e, t0)


def pseudo_label_job(dataset, index: int, cam_dir, out_dir, pseudo_cfg, skip_existing: bool = True) -> dict:
    """IRN / crf_argmax pseudo-label of item ``index`` from ``<cam_dir>/<id>.npz`` -> ``<out_dir>/<id>.png``.

    The CAM file must hold exactly the image's positive classes at the image's size. Returns a
    LABEL_SCHEMA row (``label_job``): classes, size, fraction of 255 pixels, sha256 of the PNG bytes.
    """
    def make_label(classes, hw):
        cam_classes, cams = load_image_cams(cam_dir, dataset.ids[index], classes, hw)
        return pseudo_label_from_config(read_rgb(dataset, index), cams, cam_classes, pseudo_cfg)

    return label_job(dataset, index, out_dir, make_label, skip_existing=skip_existing)


# ---------------------------------------------------------------------------------- manifests


def rows_to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
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
    ``overwrite``. A ``checkpoint`` in it is recorded with its content (``checkpoint_sha256``: a
    model retrained into the same folder is another input), a ``cam_dir`` with its own run spec's
    sha256. An accepted folder that is written is then cleared of the temporary files of writers
    killed mid-write.
    """
    path = location(out_dir) / "run_spec.json"
    spec = json.loads(strict_json(spec))
    if spec.get("checkpoint"):
        from cpal_ray.engine.checkpoint import checkpoint_digest

        spec["checkpoint_sha256"] = checkpoint_digest(spec["checkpoint"])
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
