"""Image-level label files: the two formats, reading them without running code, converting.

Both formats hold one mapping, sample id -> multi-hot vector over the N foreground classes:

  cls_labels.json   {"2007_000032": [1, 0, ..., 1], ...}   plain JSON (``convert_labels`` writes it)
  cls_labels.npy    ``np.save`` of a Python dict: the files of the public WSSS code bases (IRN,
                    SIPE, AMN), keyed by int (``2007000032``) or str ids

An ``.npy`` dict is a pickle, and a crafted pickle runs code when it is loaded. So it is never
given to ``pickle`` or ``np.load(allow_pickle=True)``: ``read_npy_dict`` checks the npy header,
then unpickles with ``LabelUnpickler``, which resolves only the few numpy names such a file
refers to (array and scalar reconstruction, dtypes) and refuses every other class or function
by name before anything is called; the result must be a dict of int/str keys and numeric arrays.

Which file a reader uses (``find_labels_file``): ``data.cls_labels`` when given (a path, or a
``bundled:`` name of the labels shipped in the package, see ``cpal_ray.data.assets``), else
``<root>/cls_labels.json``, else ``<root>/cls_labels.npy``, else the reader's fallback (VOC: the
packaged VOC 2012 labels, announced at WARNING level). ``cls_labels_value`` is how a run records
the file it used (saved configs, manifests): the ``data.cls_labels`` that names it again.
"""
from __future__ import annotations

import codecs
import functools
import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Hashable

import numpy as np

from cpal_ray.data.assets import BUNDLED_LABELS, bundled_name
from cpal_ray.data.files import DataError
from cpal_ray.formatting import strict_json
from cpal_ray.storage import location

log = logging.getLogger(__name__)

LABEL_FILE_NAMES = ("cls_labels.json", "cls_labels.npy")
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / numpy 1


def _latin1(text, encoding="latin1"):
    """``_codecs.encode`` as numpy's protocol-2 pickles use it (array bytes kept as latin-1 text)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"label file: text encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


# The only names a label pickle may refer to, under the module names numpy 1 and 2 write.
_ALLOWED = {
    **{(m, "_reconstruct"): _multiarray._reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _multiarray.scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class LabelUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and scalars in plain containers; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a label file never holds") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a label file")


def read_npy_dict(path: str | os.PathLike) -> dict:
    """The dict of an ``np.save``'d label file, unpickled safely (module docstring); DataError naming
    the file when it is not an npy dict of numeric arrays keyed by int or str."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise DataError(f"{p}: npy format version {version} is not read for label files")
            if dtype != np.dtype(object) or shape != ():
                raise DataError(f"{p}: expected an np.save'd dict {{id: multi-hot}}, got array {shape} {dtype}")
            obj = LabelUnpickler(f, encoding="latin1").load()
    except DataError:
        raise
    except (pickle.UnpicklingError, OSError, ValueError, EOFError, TypeError, AttributeError) as e:
        raise DataError(f"{p}: not a label file cpal-ray can read safely: {e}") from e
    d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == () else obj
    if not isinstance(d, dict):
        raise DataError(f"{p}: expected an np.save'd dict, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(k, (str, int, np.integer)) or isinstance(k, bool):
            raise DataError(f"{p}: key {k!r} is a {type(k).__name__}; label ids are int or str")
        if not (isinstance(v, np.ndarray) and v.dtype.kind in "biuf"):
            raise DataError(f"{p}: the label of id {k!r} is a {type(v).__name__}, not a numeric array")
    return d


def read_json_dict(path: str | os.PathLike) -> dict:
    """The mapping of a ``cls_labels.json`` as {id: float32 array}; DataError naming the file otherwise."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p}: cannot read image-level labels: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"{p}: expected a JSON object {{id: [0/1, ...]}}, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if not (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise DataError(f"{p}: the label of id {k!r} is not a list of numbers")
        out[k] = np.asarray(v, dtype=np.float32)
    return out


def read_label_file(path: str | os.PathLike) -> dict:
    """{raw id: numeric array} of a ``.json`` or ``.npy`` label file (by suffix)."""
    p = Path(path)
    if p.suffix == ".json":
        return read_json_dict(p)
    if p.suffix == ".npy":
        return read_npy_dict(p)
    raise DataError(f"{p}: image-level labels must be a .json or an .npy file")


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int) -> dict:
    return read_label_file(path)


def load_label_dict(path: str | os.PathLike, key_fn: Callable[[Any], Hashable]) -> dict:
    """Read a label file (either format) re-keyed by ``key_fn``: {key_fn(raw id): float32 array}.

    Two raw keys that normalise to the same key must carry the same label, else DataError.
    """
    p = Path(path)
    try:
        raw = _cached(str(p.resolve()), p.stat().st_mtime_ns)
    except OSError as e:
        raise DataError(f"{p}: cannot read image-level labels: {e}") from e
    out: dict = {}
    for k, v in raw.items():
        key = key_fn(k)
        vec = np.asarray(v, dtype=np.float32)
        if key in out and not np.array_equal(out[key], vec):
            raise DataError(f"{p}: keys {k!r} and another spelling of the same id disagree (id {key})")
        out[key] = vec
    return out


def find_labels_file(root: Path, cls_labels: str = "", fallback: Path | None = None, reader: str = "") -> Path:
    """The label file a reader uses (module docstring). ``fallback``: used, with a WARNING naming it,
    when ``root`` has no label file of its own; None = DataError. A given file must exist."""
    if cls_labels:
        if cls_labels.startswith("bundled:"):
            if cls_labels not in BUNDLED_LABELS:
                raise DataError(f"data.cls_labels={cls_labels!r}: unknown; bundled labels: {sorted(BUNDLED_LABELS)}")
            return BUNDLED_LABELS[cls_labels]
        for p in (Path(cls_labels).expanduser(), root / cls_labels):
            if p.is_file():
                return p
        raise DataError(f"{cls_labels}: image-level labels file not found (also tried under {root})")
    for name in LABEL_FILE_NAMES:
        if (root / name).is_file():
            return root / name
    if fallback is None:
        raise DataError(f"{root}: no image-level labels file ({' or '.join(LABEL_FILE_NAMES)}); set data.cls_labels")
    log.warning("%s%s has no %s: using the labels %s (%s). Right for an unchanged dataset; for relabelled "
                "images put their labels in the folder or set data.cls_labels", reader and f"{reader}: ", root,
                " or ".join(LABEL_FILE_NAMES), cls_labels_value(fallback), fallback)
    return fallback


def cls_labels_value(path: Path) -> str:
    """The ``data.cls_labels`` that names a label file, as a run records it: its ``bundled:`` name,
    else its absolute path."""
    return bundled_name(path) or str(Path(path).expanduser().resolve())


def write_labels_json(path: str | os.PathLike, labels: dict) -> Path:
    """Write {id: multi-hot} as ``cls_labels.json`` (ids as text, sorted; 0/1 as ints), atomically."""
    out = {}
    for k in sorted(labels, key=str):
        v = np.asarray(labels[k], dtype=np.float64)
        out[str(k)] = [int(x) for x in v] if np.isin(v, (0.0, 1.0)).all() else v.tolist()
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {strict_json(v)}" for k, v in out.items()) + "\n}\n"
    location(path).write_text(text)
    return Path(path)


def convert_labels(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> tuple[Path, int]:
    """Write the JSON form of the label file ``src`` (either format; default ``dst``: ``src`` with
    the suffix ``.json``). Returns (dst, number of ids). The ids keep their spelling as text."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".json")
    if dst.resolve() == src.resolve():
        raise DataError(f"{src}: source and destination are the same file")
    labels = read_label_file(src)
    write_labels_json(dst, labels)
    log.info("%s -> %s (%d ids)", src, dst, len(labels))
    return dst, len(labels)

