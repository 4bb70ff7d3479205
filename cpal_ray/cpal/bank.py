"""The categorical support bank (Sec. 3.2): a per-class FIFO of instance prototypes, and the
context prototypes (Eq. 5) clustered from it.

The bank interface, ``Bank`` below, is what CPAL's training hook uses
(``cpal_ray.engine.cpal_hooks.CPALHook``). Three classes implement it with one signature per
method: ``PrototypeBank`` (in process), ``cpal_ray.cpal.shards.ShardedBank`` (S in-process class
shards) and ``cpal_ray.distributed.bank_actor.BankClient`` (Ray actors holding ``PrototypeBank``s)::

    push(key, class_ids, protos) -> bool   store (M, D) prototypes of classes (M,) under a key, once
    cluster(tag) -> Context | None    k-means once per tag; None while the bank is empty
    state_dict() / load_state_dict(state | None)
    stats() -> dict                   fill per class, keys, last clustering's time and device

Pushes are keyed — (epoch, step, rank) in training — and a key already stored is ignored, so a
retried step never stores twice. ``cluster(tag)`` turns the bank into context prototypes once
per tag and bumps the version; asking again with the same tag returns the same ``Context``,
which is how N workers trigger a single clustering. The bank's state holds its last
``Context``: a checkpoint stores the context once, inside the bank.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Hashable, Iterable, Protocol, runtime_checkable

import numpy as np
import torch

from cpal_ray.cpal.kmeans import kmeans

log = logging.getLogger(__name__)


def host_float32(protos) -> np.ndarray:
    """Prototypes as a float32 numpy array on the host (a tensor is detached and copied off its device)."""
    if isinstance(protos, torch.Tensor):
        protos = protos.detach().cpu().numpy()
    return np.asarray(protos, dtype=np.float32)


def pack_pushes(items) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """[(key, class_ids (M_i,), protos (M_i, D))] -> (keys, counts (K,), class_ids (sum M,), protos (sum M, D)).

    The wire format of a batch of pushes: four objects whatever the number of steps, so a Ray
    call carrying n steps costs about what a call carrying one does."""
    keys = [k for k, _, _ in items]
    cls = [np.asarray(c, dtype=np.int64).reshape(-1) for _, c, _ in items]
    vecs = [host_float32(v) for _, _, v in items]
    dim = next((v.shape[-1] for v in vecs if v.ndim == 2 and v.size), 0)
    vecs = [v.astype(np.float32, copy=False).reshape(len(c), -1) if len(c) else np.zeros((0, dim), np.float32)
            for c, v in zip(cls, vecs)]
    counts = np.array([len(c) for c in cls], dtype=np.int64)
    if not items or counts.sum() == 0:
        return keys, counts, np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return keys, counts, np.concatenate(cls), np.concatenate(vecs)


@dataclass(frozen=True)
class Context:
    """Context prototypes as a training step and the PACAM see them.

    prototypes: (N, P, D) float32, rows >= counts[n] are padding; counts: (N,) int64 valid rows
    per class (0 = no prototypes for that class); version: the clustering that made them (1, 2, …).
    """
    prototypes: torch.Tensor
    counts: torch.Tensor
    version: int

    def to(self, device) -> "Context":
        return Context(self.prototypes.to(device), self.counts.to(device), self.version)

    def state_dict(self) -> dict:
        """Tensors and an int: loadable with ``torch.load(weights_only=True)``."""
        return {"prototypes": self.prototypes.detach().cpu(), "counts": self.counts.detach().cpu(),
                "version": int(self.version)}

    @classmethod
    def from_state(cls, state: dict | None) -> "Context | None":
        """Inverse of ``state_dict``; None for a missing state or one without any prototype."""
        if not state or int(state["counts"].sum()) == 0:
            return None
        return cls(state["prototypes"].float(), state["counts"].long(), int(state["version"]))


@runtime_checkable
class Bank(Protocol):
    """The support bank as the training hook sees it (module docstring). ``push`` answers False
    when the bank already holds the key (a retried step stores nothing) and True otherwise; a
    client that sends pushes asynchronously answers True (the bank itself ignores a known key)."""

    def push(self, key: Hashable, class_ids: Iterable[int], protos) -> bool: ...

    def cluster(self, tag: str | None = None) -> Context | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict | None) -> None: ...

    def stats(self) -> dict: ...


def _key_str(key: Hashable) -> str:
    return "-".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


class PrototypeBank:
    """Per-class FIFO of D-dim prototypes, ``capacity`` entries per class.

    Args:
        num_classes: N foreground classes.
        dim: D, the prototype dimension.
        capacity: entries kept per class (paper: 1000); the oldest go first.
        num_clusters: N_p context prototypes per class (paper: 50).
        spherical: run spherical k-means (for L2-normalised entries).
        kmeans_iters, seed, kmeans_redo: faiss k-means settings (iterations, seed, restarts).
        prefer_gpu: let faiss use a GPU when it sees one.
        class_ids: the global class id of each of the bank's rows (a shard of a sharded bank,
            ``cpal_ray.cpal.shards``); default 0..N-1. Only the k-means seeds use it (seed + id),
            so a shard clusters its classes exactly as the unsharded bank would.
    """

    def __init__(self, num_classes: int, dim: int, capacity: int = 1000, num_clusters: int = 50,
                 spherical: bool = True, kmeans_iters: int = 20, seed: int = 1234, prefer_gpu: bool = True,
                 kmeans_redo: int = 5, class_ids=None):
        if num_classes < 1 or dim < 1 or capacity < 1 or not 1 <= num_clusters <= capacity:
            raise ValueError(f"bad bank shape: classes={num_classes} dim={dim} capacity={capacity} clusters={num_clusters}")
        self.class_ids = np.arange(num_classes) if class_ids is None else np.asarray(class_ids, dtype=np.int64)
        if self.class_ids.shape != (num_classes,):
            raise ValueError(f"class_ids has shape {self.class_ids.shape}, the bank has {num_classes} classes")
        self.num_classes, self.dim, self.capacity, self.num_clusters = num_classes, dim, capacity, num_clusters
        self.spherical, self.kmeans_iters, self.seed, self.prefer_gpu = spherical, kmeans_iters, seed, prefer_gpu
        self.kmeans_redo = kmeans_redo
        self._reset()

    def _reset(self) -> None:
        num_classes, capacity, dim = self.num_classes, self.capacity, self.dim
        self._data = np.zeros((num_classes, capacity, dim), dtype=np.float32)
        self._size = np.zeros(num_classes, dtype=np.int64)   # entries held per class
        self._head = np.zeros(num_classes, dtype=np.int64)   # next slot to write per class
        self._pushed = np.zeros(num_classes, dtype=np.int64)  # entries ever pushed per class
        self._keys: set[str] = set()
        self.version = 0
        self.cluster_tag: str | None = None
        self.context: Context | None = None  # the last clustering (None before the first one)
        self.last_cluster_seconds = 0.0
        self.last_cluster_device = "none"

    # ------------------------------------------------------------------ pushes
    def push(self, key: Hashable, class_ids: Iterable[int], protos) -> bool:
        """Store prototypes (M, D) of classes class_ids (M,) under ``key``; False if the key was seen."""
        k = _key_str(key)
        if k in self._keys:
            return False
        cls = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        vec = host_float32(protos)
        vec = vec.astype(np.float32, copy=False).reshape(len(cls), -1) if len(cls) else vec.reshape(0, self.dim)
        if vec.shape[1] != self.dim:
            raise ValueError(f"push {k}: prototypes have dim {vec.shape[1]}, bank has {self.dim}")
        if len(cls) and (cls.min() < 0 or cls.max() >= self.num_classes):
            raise ValueError(f"push {k}: class ids {cls.tolist()} outside [0, {self.num_classes})")
        if not np.isfinite(vec).all():
            raise ValueError(f"push {k}: non-finite prototype values")
        for c, v in zip(cls, vec):
            self._data[c, self._head[c]] = v
            self._head[c] = (self._head[c] + 1) % self.capacity
            self._size[c] = min(self._size[c] + 1, self.capacity)
            self._pushed[c] += 1
        self._keys.add(k)
        return True

    def push_many(self, items) -> list[bool]:
        """``push`` for each (key, class_ids, protos) of items, in order (a batch of steps)."""
        return self.push_batch(*pack_pushes(items))

    def push_batch(self, keys: list, counts, class_ids, protos) -> list[bool]:
        """Several steps' pushes packed in 4 arrays (``pack_pushes``): the same result as ``push``
        for each key in order, validated and written with a handful of array operations.

        keys: K step keys; counts: (K,) int64 entries per key; class_ids: (sum counts,) int64;
        protos: (sum counts, D) float32. Returns per key True if stored, False if seen before.
        """
        keys = [_key_str(k) for k in keys]
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        cls = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        vec = np.asarray(protos, dtype=np.float32).reshape(len(cls), -1) if len(cls) else np.zeros((0, self.dim))
        ends = np.cumsum(counts)
        if len(counts) != len(keys) or (ends[-1] if len(ends) else 0) != len(cls):
            raise ValueError(f"push batch: {len(keys)} keys, {len(counts)} counts summing to "
                             f"{int(ends[-1]) if len(ends) else 0}, {len(cls)} class ids")
        if vec.shape[1] != self.dim:
            raise ValueError(f"push {keys[0]}: prototypes have dim {vec.shape[1]}, bank has {self.dim}")
        bad = (cls < 0) | (cls >= self.num_classes) | ~np.isfinite(vec).all(1)
        if bad.any():
            i = int(np.argmax(bad))
            k = keys[int(np.searchsorted(ends, i, side="right"))]
            what = (f"class ids {cls[i]} outside [0, {self.num_classes})" if not 0 <= cls[i] < self.num_classes
                    else "non-finite prototype values")
            raise ValueError(f"push {k}: {what}")
        stored, take = [], np.zeros(len(cls), dtype=bool)
        for k, start, end in zip(keys, ends - counts, ends):
            new = k not in self._keys
            if new:
                self._keys.add(k)
                take[start:end] = True
            stored.append(new)
        cls, vec = cls[take], vec[take]
        for c in np.unique(cls):  # per class, in arrival order: the FIFO of sequential pushes
            rows = vec[cls == c]
            n = len(rows)
            if n > self.capacity:  # only the newest capacity entries survive
                skip = n - self.capacity
                self._head[c] = (self._head[c] + skip) % self.capacity
                rows = rows[skip:]
            slots = (self._head[c] + np.arange(len(rows))) % self.capacity
            self._data[c, slots] = rows
            self._head[c] = (self._head[c] + len(rows)) % self.capacity
            self._size[c] = min(self._size[c] + n, self.capacity)
            self._pushed[c] += n
        return stored

    def has_key(self, key: Hashable) -> bool:
        return _key_str(key) in self._keys

    @property
    def keys(self) -> set[str]:
        return set(self._keys)

    def counts(self) -> np.ndarray:
        """Entries held per class, (N,)."""
        return self._size.copy()

    def pushed(self) -> np.ndarray:
        """Entries ever pushed per class (including those since evicted), (N,)."""
        return self._pushed.copy()

    def entries(self, c: int) -> np.ndarray:
        """Class c's entries, oldest first, (size, D)."""
        size, head = int(self._size[c]), int(self._head[c])
        if size < self.capacity:
            return self._data[c, :size].copy()
        return np.concatenate([self._data[c, head:], self._data[c, :head]], axis=0)

    # -------------------------------------------------------------- clustering
    def cluster(self, tag: str | None = None) -> Context | None:
        """Eq. (5) for every class: the ``Context`` (N, N_p, D) of this bank; None while it is empty.

        With a ``tag`` equal to the last clustering's tag nothing runs and the same context comes
        back (so several workers can ask and only one clustering happens). A class with fewer
        entries than N_p keeps its entries; a class with none has count 0.
        """
        if tag is not None and tag == self.cluster_tag:
            return self.context
        if self._size.sum() == 0:
            return None
        t0 = time.perf_counter()
        context = np.zeros((self.num_classes, self.num_clusters, self.dim), dtype=np.float32)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        devices = set()
        for c in range(self.num_classes):
            x = self.entries(c)
            if len(x) == 0:
                continue
            cents, dev = kmeans(x, self.num_clusters, niter=self.kmeans_iters, seed=self.seed + int(self.class_ids[c]),
                                spherical=self.spherical, prefer_gpu=self.prefer_gpu, nredo=self.kmeans_redo)
            context[c, : len(cents)] = cents
            counts[c] = len(cents)
            devices.add(dev)
        self.version += 1
        self.context = Context(torch.from_numpy(context), torch.from_numpy(counts), self.version)
        self.cluster_tag = tag
        self.last_cluster_seconds = time.perf_counter() - t0
        self.last_cluster_device = "gpu" if "gpu" in devices else ("cpu" if "cpu" in devices else "none")
        log.info("bank clustering v%d (tag=%s): %d classes with prototypes, %.3fs on %s", self.version, tag,
                 int((counts > 0).sum()), self.last_cluster_seconds, self.last_cluster_device)
        return self.context

    def stats(self) -> dict:
        """bank_fill / bank_pushed / context_counts per class, bank_keys, context_version, and the
        last clustering's cluster_seconds and cluster_device."""
        return {"bank_fill": self._size.tolist(), "bank_pushed": self._pushed.tolist(), "bank_keys": len(self._keys),
                "context_version": self.version,
                "context_counts": self.context.counts.tolist() if self.context is not None else [0] * self.num_classes,
                "cluster_seconds": self.last_cluster_seconds, "cluster_device": self.last_cluster_device}

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to rebuild the bank exactly, its last context included (tensors and
        plain types only, so the dict loads with ``torch.load(weights_only=True)``)."""
        return {
            "shape": [self.num_classes, self.dim, self.capacity, self.num_clusters],
            "data": torch.from_numpy(self._data.copy()),
            "size": torch.from_numpy(self._size.copy()),
            "head": torch.from_numpy(self._head.copy()),
            "pushed": torch.from_numpy(self._pushed.copy()),
            "keys": sorted(self._keys),
            "version": self.version,
            "cluster_tag": self.cluster_tag,
            "context": self.context.state_dict() if self.context is not None else None,
        }

    def load_state_dict(self, state: dict | None) -> None:
        """Restore ``state_dict()`` output; None empties the bank (a run starting from scratch)."""
        if state is None:
            self._reset()
            return
        shape = [self.num_classes, self.dim, self.capacity, self.num_clusters]
        if list(state["shape"]) != shape:
            raise ValueError(f"bank state has shape {list(state['shape'])} (classes, dim, capacity, clusters); this bank is {shape}")
        self._data = state["data"].numpy().astype(np.float32).copy()
        self._size = state["size"].numpy().astype(np.int64).copy()
        self._head = state["head"].numpy().astype(np.int64).copy()
        self._pushed = state["pushed"].numpy().astype(np.int64).copy()
        self._keys = set(state["keys"])
        self.version = int(state["version"])
        self.cluster_tag = state["cluster_tag"]
        self.context = Context.from_state(state["context"])

    @classmethod
    def from_config(cls, cfg, dim: int, prefer_gpu: bool = True, class_ids=None) -> "PrototypeBank":
        """The bank of a run (or, with ``class_ids``, one shard of it): the one mapping from
        ``Config`` (``cpal`` + ``data``) to bank arguments."""
        c = cfg.cpal
        n = cfg.bank_classes if class_ids is None else len(class_ids)
        return cls(n, dim, capacity=c.bank_size, num_clusters=c.num_clusters,
                   spherical=c.normalize_bank, kmeans_iters=c.kmeans_iters, seed=c.kmeans_seed,
                   prefer_gpu=prefer_gpu, kmeans_redo=c.kmeans_redo, class_ids=class_ids)
