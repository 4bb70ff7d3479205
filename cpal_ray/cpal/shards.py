"""One logical support bank held as S class shards: routing of pushes, merging of contexts, stats, state.

A shard is a ``PrototypeBank`` over a subset of the classes (``class_ids``: the global ids of its
rows, so its k-means seeds are those of an unsharded bank and the context comes out the same).
Class c lives in shard ``c % S``. The functions here are the whole of the sharding logic; the
in-process ``ShardedBank`` below and the Ray client (``cpal_ray.distributed.bank_actor.BankClient``)
call them, so a sharded bank behaves identically with or without Ray.

Keys. A push is split by shard and every shard stores its key (with the prototypes of its
classes, possibly none), so every shard knows every step and a retried step is ignored by all of
them, whatever classes it carries. ``merge_states`` writes a checkpoint of exactly the format
of an unsharded bank (S = 1 and S = 4 restore each other's checkpoints); on restore every shard
gets every key.

Versions. A shard whose classes are all still empty returns no context and keeps its version;
the logical version (and cluster tag) is that of the most advanced shard.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np
import torch

from cpal_ray.cpal.bank import Context, PrototypeBank, host_float32

PushItem = tuple  # (key, class_ids (M,) int64, protos (M, D) float32)


def shard_classes(num_classes: int, shards: int) -> list[np.ndarray]:
    """Global class ids of each shard: class c in shard c % S. Every shard holds >= 1 class."""
    if not 1 <= shards <= num_classes:
        raise ValueError(f"cpal.bank_shards must be in [1, {num_classes}] (one class per shard at most), got {shards}")
    return [np.arange(s, num_classes, shards, dtype=np.int64) for s in range(shards)]


def _local_index(groups: Sequence[np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard of each class (N,), row of each class inside its shard (N,))."""
    shard_of = np.empty(num_classes, dtype=np.int64)
    row_of = np.empty(num_classes, dtype=np.int64)
    for s, g in enumerate(groups):
        shard_of[g] = s
        row_of[g] = np.arange(len(g))
    return shard_of, row_of


def route_pushes(items: Sequence[PushItem], groups: Sequence[np.ndarray], num_classes: int) -> list[list[PushItem]]:
    """Split pushes by shard: shard s gets (key, local class ids, protos) of its classes.

    items: [(key, class_ids (M,), protos (M, D))]; returns S lists of items with local class ids.
    Every shard gets every key, with no prototypes when none of the push's classes is its own,
    so each shard knows every step it has seen and a retried step is ignored by all of them.
    """
    shard_of, row_of = _local_index(groups, num_classes)
    out: list[list[PushItem]] = [[] for _ in groups]
    for key, class_ids, protos in items:
        cls = np.asarray(class_ids, dtype=np.int64).reshape(-1)
        vec = np.asarray(protos, dtype=np.float32)
        vec = vec.reshape(len(cls), -1) if len(cls) else vec.reshape(0, vec.shape[-1] if vec.ndim == 2 else 0)
        if len(cls) and (cls.min() < 0 or cls.max() >= num_classes):
            raise ValueError(f"push {key}: class ids {cls.tolist()} outside [0, {num_classes})")
        where = shard_of[cls]
        for s in range(len(groups)):
            m = where == s
            out[s].append((key, row_of[cls[m]], vec[m]))
    return out


def merge_contexts(parts: Sequence[Context | None], groups: Sequence[np.ndarray], num_classes: int) -> Context | None:
    """The logical ``Context`` (N, N_p, D) from the shards' contexts (n_s, N_p, D); None if all are None."""
    have = [(g, p) for g, p in zip(groups, parts) if p is not None]
    if not have:
        return None
    _, first = have[0]
    protos = torch.zeros((num_classes, *first.prototypes.shape[1:]), dtype=first.prototypes.dtype)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for g, p in have:
        idx = torch.from_numpy(g)
        protos[idx] = p.prototypes
        counts[idx] = p.counts
    return Context(protos, counts, max(p.version for _, p in have))


def merge_stats(parts: Sequence[dict], groups: Sequence[np.ndarray], num_classes: int) -> dict:
    """``PrototypeBank.stats()`` of the logical bank from the shards' stats.

    Per-class lists are scattered back to global class order; every shard holds every key, so
    ``bank_keys`` is any shard's count (the largest, should one lag). The clustering time is the
    slowest shard's (on Ray the shards cluster in parallel; ``ShardedBank`` in one process
    clusters them one after another)."""
    out = dict(parts[0])
    for field in ("bank_fill", "bank_pushed", "context_counts"):
        merged = [0] * num_classes
        for g, p in zip(groups, parts):
            for row, c in enumerate(g):
                merged[int(c)] = p[field][row]
        out[field] = merged
    out["bank_keys"] = max(p["bank_keys"] for p in parts)
    out["context_version"] = max(p["context_version"] for p in parts)
    out["cluster_seconds"] = max(p["cluster_seconds"] for p in parts)
    devices = {p["cluster_device"] for p in parts}  # "gpu" only if no shard fell back to the CPU
    out["cluster_device"] = "cpu" if "cpu" in devices else ("gpu" if "gpu" in devices else "none")
    out["bank_shards"] = len(parts)
    return out


def merge_states(states: Sequence[dict], groups: Sequence[np.ndarray], num_classes: int) -> dict:
    """One ``PrototypeBank.state_dict()`` of the logical (unsharded) bank from the shards' states."""
    _, dim, capacity, clusters = states[0]["shape"]
    data = torch.zeros((num_classes, capacity, dim), dtype=torch.float32)
    size, head, pushed = (torch.zeros(num_classes, dtype=torch.int64) for _ in range(3))
    keys = set(states[0]["keys"])
    for s, (g, st) in enumerate(zip(groups, states)):
        idx = torch.from_numpy(g)
        data[idx], size[idx], head[idx], pushed[idx] = st["data"], st["size"], st["head"], st["pushed"]
        if set(st["keys"]) != keys:  # every shard stores every key: a difference means a shard lost state
            raise ValueError(f"bank shard {s} holds {len(st['keys'])} keys, shard 0 holds {len(keys)}: "
                             "a shard lost its state; resume from the last checkpoint")
    lead = max(states, key=lambda st: st["version"])
    contexts = [Context.from_state(st["context"]) for st in states]
    context = merge_contexts(contexts, groups, num_classes)
    return {"shape": [num_classes, dim, capacity, clusters], "data": data, "size": size, "head": head,
            "pushed": pushed, "keys": sorted(keys), "version": int(lead["version"]),
            "cluster_tag": lead["cluster_tag"], "context": context.state_dict() if context is not None else None}


def split_state(state: dict | None, groups: Sequence[np.ndarray]) -> list[dict | None]:
    """The shards' states from one logical state (None stays None for every shard)."""
    if state is None:
        return [None] * len(groups)
    num_classes, dim, capacity, clusters = state["shape"]
    ctx = state["context"]
    out = []
    for g in groups:
        idx = torch.from_numpy(g)
        part_ctx = None
        if ctx is not None:
            part_ctx = {"prototypes": ctx["prototypes"][idx], "counts": ctx["counts"][idx], "version": ctx["version"]}
        out.append({"shape": [len(g), dim, capacity, clusters], "data": state["data"][idx], "size": state["size"][idx],
                    "head": state["head"][idx], "pushed": state["pushed"][idx], "keys": list(state["keys"]),
                    "version": state["version"], "cluster_tag": state["cluster_tag"], "context": part_ctx})
    return out


class ShardedBank:
    """The ``Bank`` of ``cpal_ray.cpal.bank`` over S in-process ``PrototypeBank`` shards.

    What the Ray client does with S actors, in one process (tests, and ``fit_local`` with
    ``cpal.bank_shards > 1``): it must give the same contexts, stats and states as one bank.
    """

    def __init__(self, shards: Sequence[PrototypeBank], groups: Sequence[np.ndarray], num_classes: int):
        self.shards, self.groups, self.num_classes = list(shards), list(groups), num_classes

    @classmethod
    def from_config(cls, cfg, dim: int, prefer_gpu: bool = True) -> "ShardedBank":
        groups = shard_classes(cfg.bank_classes, cfg.cpal.bank_shards)
        return cls([PrototypeBank.from_config(cfg, dim, prefer_gpu=prefer_gpu, class_ids=g) for g in groups],
                   groups, cfg.bank_classes)

    def push(self, key: Hashable, class_ids: Iterable[int], protos) -> bool:
        return self.push_many([(key, class_ids, protos)])[0]

    def push_many(self, items: Sequence[PushItem]) -> list[bool]:
        """Store several pushes; per push, True if stored (False = key seen before, by every shard)."""
        items = [(k, np.asarray(c, dtype=np.int64), host_float32(p)) for k, c, p in items]
        answers = [shard.push_many(part) for shard, part in
                   zip(self.shards, route_pushes(items, self.groups, self.num_classes))]
        return [any(col) for col in zip(*answers)]

    def cluster(self, tag: str | None = None) -> Context | None:
        return merge_contexts([s.cluster(tag) for s in self.shards], self.groups, self.num_classes)

    def stats(self) -> dict:
        return merge_stats([s.stats() for s in self.shards], self.groups, self.num_classes)

    def state_dict(self) -> dict:
        return merge_states([s.state_dict() for s in self.shards], self.groups, self.num_classes)

    def load_state_dict(self, state: dict | None) -> None:
        for shard, part in zip(self.shards, split_state(state, self.groups)):
            shard.load_state_dict(part)


def make_bank(cfg, dim: int, prefer_gpu: bool = True) -> PrototypeBank | ShardedBank:
    """The in-process bank of a run: one ``PrototypeBank``, or ``cpal.bank_shards`` of them."""
    if cfg.cpal.bank_shards == 1:
        return PrototypeBank.from_config(cfg, dim, prefer_gpu=prefer_gpu)
    return ShardedBank.from_config(cfg, dim, prefer_gpu=prefer_gpu)
