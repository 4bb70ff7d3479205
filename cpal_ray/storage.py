"""Where runs and outputs live: a local folder or an object-store URI, through ``pyarrow.fs``.

Every storage location of cpal-ray (training runs, sweeps, CAM files, pseudo-labels, reports)
is a ``Location``: a ``pyarrow.fs`` filesystem and a path on it, as Ray Train and Tune take them
(``storage_filesystem`` + ``storage_path``). ``pathlib`` is never used for a URI
(``Path("s3://b/x")`` silently becomes ``s3:/b/x``).

    loc = location("s3://bucket/runs")        # or "/shared/runs", "runs", "file:///…", "gs://…"
    (loc / "cams" / "a.npz").write_bytes(data)

Object stores: credentials and region come from the usual AWS variables or instance profile,
never from the URI (``s3://KEY:SECRET@bucket`` is refused, without echoing them); a
custom endpoint (MinIO, moto, Ceph) from ``AWS_ENDPOINT_URL`` or the URI itself
(``s3://bucket/runs?endpoint_override=host:9000&scheme=http``); ``str(loc)`` keeps that query,
so a location travels to Ray workers as text and resolves to the same store there.

Writes are whole-object and atomic: a local file is written to a hidden temporary file beside
it, fsynced and renamed; an object is one upload that appears complete or not at all. So a
reader, or a resumed run after a crash, never sees half a file under its final name; the
temporary files of a killed writer are removed when its stage runs again (``remove_temp_files``).
A local file gets the mode ``open()`` would give it (0666 less the umask: readable by colleagues
and a TensorBoard server on a shared file system), not the 0600 of the temporary file.
"""
from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = ["Location", "StorageError", "location", "is_uri", "remove_temp_files"]
# Object stores whose URIs are scheme://bucket/key, with the path on the filesystem "bucket/key".
BUCKET_SCHEMES = ("s3", "gs", "gcs")


class StorageError(ValueError):
    """A storage location that cannot be used as written; the message never holds credentials."""


def _refuse_user_info(text: str) -> None:
    """StorageError for a URI with user info (``s3://KEY:SECRET@bucket/…``), which would put a
    secret into paths, logs and tracebacks; the message leaves the user info out."""
    parts = urlsplit(text)
    if "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        raise StorageError(f"{parts.scheme}://<user info>@{host}{parts.path}: a storage URI must not hold credentials; "
                           "give them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an "
                           "instance profile, GOOGLE_APPLICATION_CREDENTIALS)")


def is_uri(text: str) -> bool:
    """True for ``scheme://…`` (s3, gs, hdfs, file, …); False for a plain local path."""
    return "://" in str(text)


@dataclass(frozen=True)
class Location:
    """A folder or file on a ``pyarrow.fs`` filesystem.

    path: the path on the filesystem (for S3 ``bucket/key``, no scheme); uri: the text this
    location was made from, extended by joins (what users see, what ``location()`` reads back);
    fs: the filesystem, made on first use (for S3 that may ask the bucket's region: naming a
    location never touches the network).
    """
    path: str
    uri: str
    _fs: pafs.FileSystem | None = field(default=None, compare=False, repr=False)

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            base, query = _split_query(self.uri)
            root = urlsplit(base)
            object.__setattr__(self, "_fs", _bucket_filesystem(f"{root.scheme}://{root.netloc}{query}"))
        return self._fs

    # ------------------------------------------------------------------ names
    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        return self.join(name)

    def join(self, *parts: str) -> "Location":
        """This location with ``parts`` appended; a ``..`` among them is refused (ValueError): a
        name joined below a folder stays below it."""
        parts = [str(p).strip("/") for p in parts if str(p).strip("/")]
        if any(c == ".." for p in parts for c in p.split("/")):
            raise ValueError(f"{self.uri}: refusing to join {'/'.join(parts)!r}, which leaves the folder ('..')")
        if not parts:
            return self
        base, query = _split_query(self.uri)
        return Location(posixpath.join(self.path, *parts), posixpath.join(base, *parts) + query, self._fs)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        base, query = _split_query(self.uri)
        return Location(posixpath.dirname(self.path.rstrip("/")), posixpath.dirname(base.rstrip("/")) + query, self._fs)

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def __fspath__(self) -> str:
        """A local location is a path (``open(loc)``, ``torch.load(loc)``); an object is not."""
        if not self.is_local:
            raise TypeError(f"{self.uri} is in an object store, not a local path: use its read_bytes()/write_bytes()")
        return self.path

    @property
    def local_path(self) -> Path:
        """The ``Path`` of a local location (ValueError for an object store)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local file system")
        return Path(self.path)

    # ------------------------------------------------------------------ queries
    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder (on an object store: a prefix with at least one object under it)."""
        return self._info().type == pafs.FileType.Directory

    def size(self) -> int:
        return int(self._info().size or 0)

    def list(self, suffix: str = "", recursive: bool = False) -> list["Location"]:
        """Files directly in this folder (or below it) whose name ends with ``suffix``, sorted."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        rel = [relative_path(i.path, self.path) for i in infos if i.type == pafs.FileType.File]
        return [self.join(r) for r in sorted(rel) if r.endswith(suffix)]

    def dirs(self) -> list["Location"]:
        """Sub-folders directly in this folder, sorted by name."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path))
        return [self.join(posixpath.basename(i.path)) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.Directory]

    # ------------------------------------------------------------------ reads
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri}: no such file") from None
        except OSError as e:
            raise OSError(f"{self.uri}: cannot read ({e})") from e

    def read_text(self) -> str:
        return self.read_bytes().decode()

    # ------------------------------------------------------------------ writes
    def mkdir(self) -> "Location":
        self.fs.create_dir(self.path, recursive=True)
        return self

    def write_bytes(self, data: bytes) -> "Location":
        """Write the whole file atomically (see the module docstring); parents are created."""
        if self.is_local:
            _atomic_local_write(Path(self.path), data)
        else:
            parent = posixpath.dirname(self.path)
            if parent:
                self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        return self

    def write_text(self, text: str) -> "Location":
        return self.write_bytes(text.encode())

    def delete(self) -> None:
        """Remove this file or folder (with its contents); nothing if it does not exist."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def copy_to(self, dest: "Location") -> "Location":
        """Copy this file or folder (recursively) to ``dest``, across filesystems."""
        if self.is_file():
            return dest.write_bytes(self.read_bytes())
        dest.mkdir()
        pafs.copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs)
        return dest

    # ------------------------------------------------------------------ local views
    @contextlib.contextmanager
    def local_copy(self):
        """Yield a local ``Path`` with this location's content (itself when local; otherwise a
        temporary download, removed afterwards). For libraries that only read local files."""
        if self.is_local:
            yield Path(self.path)
            return
        with tempfile.TemporaryDirectory(prefix="cpal-ray-") as tmp:
            dest = Path(tmp) / (self.name or "data")
            self.copy_to(location(str(dest)))
            yield dest


def location(where: "str | os.PathLike | Location") -> Location:
    """A ``Location`` for a URI (``s3://bucket/key``, ``file:///x``, …) or a local path (made
    absolute; ``~`` expanded). A ``Location`` is returned as it is."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    if text.startswith("file://"):
        text = urlsplit(text).path
    if not is_uri(text):
        path = str(Path(text).expanduser().resolve())
        return Location(path, path, pafs.LocalFileSystem())
    _refuse_user_info(text)
    base, query = _split_query(text)
    base = base.rstrip("/")
    root = urlsplit(base)
    if root.scheme not in BUCKET_SCHEMES:  # hdfs://host:port/path and the like: pyarrow parses them
        fs, path = pafs.FileSystem.from_uri(text)
        return Location(path.rstrip("/"), base + query, fs)
    if not root.netloc:
        raise ValueError(f"{text}: a storage URI needs a bucket (scheme://bucket/path)")
    return Location(f"{root.netloc}{root.path}".rstrip("/"), base + query)


@functools.lru_cache(maxsize=64)
def _bucket_filesystem(root_uri: str) -> pafs.FileSystem:
    """One filesystem per bucket (and endpoint query) and process: per-file writes of a pipeline
    must not set up a client, and resolve the bucket's region, each time."""
    return pafs.FileSystem.from_uri(root_uri)[0]


def relative_path(path: str, root: str) -> str:
    """``path`` below ``root``, both paths of one filesystem (``os.path.relpath`` would consult the
    working directory, which object-store keys have nothing to do with)."""
    path, root = path.rstrip("/"), root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{path} is not inside {root}")
    return path[len(root) + 1:]


def _split_query(uri: str) -> tuple[str, str]:
    """``s3://b/x?endpoint_override=…`` -> ("s3://b/x", "?endpoint_override=…")."""
    if not is_uri(uri) or "?" not in uri:
        return uri, ""
    parts = urlsplit(uri)
    return uri[: len(uri) - len(parts.query) - 1], "?" + parts.query


# The temporary file of ``_atomic_local_write``: ".<name>.<8 random characters of mkstemp>.tmp".
_TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_temp_files(folder) -> list[str]:
    """Remove the temporary files writers of this module left under ``folder`` (and its
    sub-folders) when they were killed mid-write; returns their paths. Called when a stage starts
    again in its folder, before any writer of it runs. An object store has none (whole uploads)."""
    folder = location(folder)
    if not folder.is_local or not os.path.isdir(folder.path):
        return []
    removed = []
    for parent, _dirs, files in os.walk(folder.path):
        for name in files:
            if _TEMP_FILE.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(parent, name))
                    removed.append(os.path.join(parent, name))
    return removed


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``);
    elsewhere set and put back at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_local_write(path: Path, data: bytes) -> None:
    """Temp file in the same folder + fsync + ``os.replace``; the temp file goes on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
