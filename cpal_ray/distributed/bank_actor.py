"""The support bank as Ray actors (one, or S class shards), and the worker-side client that pushes to them.

``BankActor`` wraps a ``PrototypeBank`` (the whole bank, or the shard of classes c % S == s,
``cpal.bank_shards``) and adds no logic beyond wiring, plus one guard: an actor restarted by
Ray (``max_restarts``) comes back *empty*, so it refuses pushes (``BankLostError``) until the
train loop restores it from the last checkpoint. The failed push fails the worker, Ray Train
restarts the run from that checkpoint, and rank 0 loads the checkpoint's bank state into the
actors: nothing lost, nothing stored twice.

How workers find them: by name. The driver creates ``cpal-bank-<run name>`` (S = 1) or
``cpal-bank-<run name>-shard<s>of<S>`` in the namespace ``cpal-ray`` before
``TorchTrainer.fit``; the train-loop config carries the names, and each worker calls
``ray.get_actor(name, namespace)``. A named actor survives worker restarts (the driver owns it)
and one name per run lets Tune trials each have their own bank.

Traffic (bench/bench_bank_scale.py measures it up to 256 workers): a worker buffers its pushes
and sends them every ``dist.bank_push_every`` steps in one call per shard (``push_batch``: the
steps packed into four arrays; each step keeps its own key, so idempotency is per step as before). Per step
that is M (valid instance prototypes of the local batch, about 1-2 per image) x D float32 + M
int64 + a short key. Once per epoch each worker fetches the context prototypes, N x N_p x D
float32 (VOC: 20 x 50 x 128 x 4 = 512 KB): each shard ``ray.put``s its part once per clustering
and every worker reads that same object from the object store (``context_ref``), rather than
the actor serialising the context once per worker.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable, Iterable

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cpal_ray.config import Config, from_dict
from cpal_ray.cpal.bank import Context, PrototypeBank, pack_pushes
from cpal_ray.cpal.kmeans import faiss_device
from cpal_ray.cpal.shards import merge_contexts, merge_states, merge_stats, route_pushes, shard_classes, split_state
from cpal_ray.distributed.runtime import NAMESPACE
from cpal_ray.models import embed_dim

log = logging.getLogger(__name__)


class BankLostError(RuntimeError):
    """The bank actor was restarted and lost its state; the run must resume from a checkpoint."""


def bank_actor_name(run_name: str) -> str:
    return f"cpal-bank-{run_name}"


class BankActor:
    """Thin actor around ``PrototypeBank`` (all methods run one at a time, in call order)."""

    def __init__(self, cfg_dict: dict, dim: int, prefer_gpu: bool, class_ids: list[int] | None = None):
        self.bank = PrototypeBank.from_config(from_dict(cfg_dict), dim, prefer_gpu=prefer_gpu, class_ids=class_ids)
        self._shared: tuple[int, object] | None = None  # (bank version, ObjectRef of its context)
        if prefer_gpu:
            if faiss_device() != "gpu":
                log.warning("bank actor was given a GPU but faiss sees none (faiss-cpu installed, or no CUDA "
                            "in this process): k-means will run on the CPU")
        self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.restarted:
            log.warning("bank actor was restarted: state lost, refusing pushes until restored from a checkpoint")

    def _guard(self):
        if self.restarted:
            raise BankLostError("the bank actor restarted and lost its state; resume from the last checkpoint")

    def ready(self) -> bool:
        return True

    def push(self, key, class_ids, protos) -> bool:
        self._guard()
        return self.bank.push(key, class_ids, protos)

    def push_batch(self, keys: list, counts, class_ids, protos) -> list[bool]:
        """Several steps' pushes in one call, packed by ``pack_pushes`` (four objects on the wire)."""
        self._guard()
        return self.bank.push_batch(keys, counts, class_ids, protos)

    def cluster(self, tag: str) -> Context | None:
        self._guard()
        return self.bank.cluster(tag)

    def context_ref(self, tag: str) -> list:
        """``cluster(tag)``, answered with ``[ObjectRef]`` of the context (``[None]`` while empty).

        The context is ``ray.put`` once per clustering; every worker then reads the same object
        from the object store (a list, so Ray hands the reference over instead of its value)."""
        context = self.cluster(tag)
        if context is None:
            return [None]
        if self._shared is None or self._shared[0] != self.bank.version:
            self._shared = (self.bank.version, ray.put(context))
        return [self._shared[1]]

    def stats(self) -> dict:
        return {**self.bank.stats(), "restarted": self.restarted, "bank_node": ray.get_runtime_context().get_node_id()}

    def cpu_seconds(self) -> float:
        """CPU time of this actor's process so far (all its threads, Ray's included): for benchmarks."""
        return time.process_time()

    def state_dict(self) -> dict:
        self._guard()  # a restarted (empty) actor must not end up in a checkpoint as an empty bank
        return self.bank.state_dict()

    def load_state_dict(self, state: dict | None) -> int:
        """Restore from a checkpoint's bank state (None = start empty); re-enables pushes."""
        self.bank.load_state_dict(state)
        self._shared = None
        self.restarted = False
        return self.bank.version


def bank_actor_names(run_name: str, shards: int = 1) -> list[str]:
    """The run's bank actor names: one for S = 1 (as before sharding), else one per shard."""
    if shards == 1:
        return [bank_actor_name(run_name)]
    return [f"{bank_actor_name(run_name)}-shard{s}of{shards}" for s in range(shards)]


def head_node_id() -> str:
    """The Ray node id of the cluster's head (the node with Ray's ``node:__internal_head__``
    resource), or this process's node when none is marked."""
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return ray.get_runtime_context().get_node_id()


def create_bank_actors(cfg: Config, names: list[str]) -> list:
    """Create (or reuse) the run's named bank actors, shard s holding classes c % S == s.

    Resources from ``cfg.dist`` (``bank_cpus``/``bank_gpus`` per actor); restarts allowed, task
    retries not (a push to a restarted actor must fail, not land in an empty bank)."""
    groups = shard_classes(cfg.bank_classes, len(names))
    here = None
    if ray.util.get_current_placement_group() is None:
        # A training run's bank goes on the head, so that losing a worker node never takes it (the
        # head is on-demand; see docs/cluster.md). Ray's default policy may pick any node for a
        # 0-CPU actor, a job's driver itself runs on a worker when the job manager does not find
        # the head's id in time, and a soft affinity was seen to fall back to a worker on a head
        # with 0 CPUs: so a hard one (a restart goes to the head again; without the head there is
        # no cluster). Inside a sweep trial the trial's placement group places the bank.
        here = NodeAffinitySchedulingStrategy(node_id=head_node_id(), soft=False)
    actors = []
    for name, group in zip(names, groups):
        opts = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=cfg.dist.bank_cpus,
                    max_restarts=-1, max_task_retries=0)
        if cfg.dist.bank_gpus > 0:
            opts["num_gpus"] = cfg.dist.bank_gpus
        if here is not None:
            opts["scheduling_strategy"] = here
        class_ids = None if len(names) == 1 else group.tolist()
        actors.append(ray.remote(BankActor).options(**opts).remote(cfg.to_dict(), embed_dim(cfg.model),
                                                                   cfg.dist.bank_gpus > 0, class_ids))
    ray.get([a.ready.remote() for a in actors])
    return actors


def create_bank_actor(cfg: Config, name: str):
    """The one actor of an unsharded bank (``create_bank_actors`` with one name)."""
    return create_bank_actors(cfg, [name])[0]


def remove_bank_actor(name: str) -> bool:
    """Kill the run's bank actor if it exists (no restart); True if one was removed."""
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


class BankClient:
    """The ``Bank`` of ``cpal_ray.cpal.bank`` for a worker of a Ray Train group, over the actor(s).

    Args:
        actors: the bank actor, or the S shard actors in shard order (``create_bank_actors``).
        max_in_flight: sends (of one call per shard) not yet answered, at most (then it waits for the oldest).
        rank, barrier: this worker's rank and the group's barrier (collective calls below).
        push_every: steps buffered per call (``dist.bank_push_every``); 1 = a call per step.
        num_classes: N, needed to route pushes to shards when there are several.

    ``push`` buffers and answers True (sent; an actor ignores a key it holds); every ``push_every``
    pushes the buffer goes out fire-and-forget, one ``push_batch`` per shard (every shard records
    every step's key). Errors of a call (``BankLostError``, a dead actor) surface at a later push or
    at ``flush`` and fail the worker, which is what triggers recovery from the checkpoint (pushes
    still buffered then are redone by the resumed steps).
    ``cluster`` and ``load_state_dict`` are collective: every rank calls them at the same point;
    pushes are flushed and the ranks meet at ``barrier`` first, so the clustering sees every
    rank's pushes, and only rank 0 restores the state. ``state_dict`` flushes this rank's buffer
    only: the loop calls it (rank 0, for the checkpoint) right after the collective ``cluster``,
    which flushed every rank's.
    """

    def __init__(self, actors, max_in_flight: int = 4, rank: int = 0, barrier=lambda: None, push_every: int = 1,
                 num_classes: int | None = None):
        self.actors = list(actors) if isinstance(actors, (list, tuple)) else [actors]
        if len(self.actors) > 1 and num_classes is None:
            raise ValueError("a sharded bank client needs num_classes to route pushes")
        self.num_classes = num_classes
        self.groups = shard_classes(num_classes, len(self.actors)) if len(self.actors) > 1 else None
        self.max_in_flight = max_in_flight
        self.push_every = push_every
        self.rank = rank
        self.barrier = barrier
        self._buffer: list = []
        self._pending: deque = deque()
        self.bytes_sent = 0
        self.pushes = 0
        self.calls = 0

    @property
    def actor(self):
        """The first (or only) bank actor."""
        return self.actors[0]

    def push(self, key: Hashable, class_ids: Iterable[int], protos) -> bool:
        class_ids = np.array(class_ids, dtype=np.int64)  # copies: the caller may reuse its arrays
        protos = np.array(protos, dtype=np.float32)
        self._buffer.append((key, class_ids, protos))
        self.bytes_sent += class_ids.nbytes + protos.nbytes + len(str(key))
        self.pushes += 1
        if len(self._buffer) >= self.push_every:
            self._send()
        return True

    def _send(self) -> None:
        if not self._buffer:
            return
        parts = [self._buffer] if self.groups is None else route_pushes(self._buffer, self.groups, self.num_classes)
        self._buffer = []
        for actor, part in zip(self.actors, parts):
            self._pending.append(actor.push_batch.remote(*pack_pushes(part)))
            self.calls += 1
        while len(self._pending) > self.max_in_flight * len(self.actors):  # max_in_flight sends, S calls each
            ray.get(self._pending.popleft())

    def flush(self) -> None:
        self._send()
        while self._pending:
            ray.get(self._pending.popleft())

    def cluster(self, tag: str | None = None) -> Context | None:
        self.flush()
        self.barrier()
        refs = [r[0] for r in ray.get([a.context_ref.remote(tag) for a in self.actors])]
        got = iter(ray.get([r for r in refs if r is not None]))
        parts = [None if r is None else next(got) for r in refs]
        if self.groups is None:
            return parts[0]
        return merge_contexts(parts, self.groups, self.num_classes)

    def stats(self) -> dict:
        own = {"bank_bytes_per_step": self.bytes_sent / max(self.pushes, 1),
               "bank_calls_per_step": self.calls / max(self.pushes, 1)}
        if self.groups is None:
            return {**ray.get(self.actor.stats.remote()), **own}
        parts = ray.get([a.stats.remote() for a in self.actors])
        return {**merge_stats(parts, self.groups, self.num_classes),
                "restarted": any(p["restarted"] for p in parts), **own}

    def state_dict(self) -> dict:
        self.flush()
        if self.groups is None:
            return ray.get(self.actor.state_dict.remote())
        return merge_states(ray.get([a.state_dict.remote() for a in self.actors]), self.groups, self.num_classes)

    def load_state_dict(self, state: dict | None) -> None:
        if self.rank == 0:
            parts = [state] if self.groups is None else split_state(state, self.groups)
            ray.get([a.load_state_dict.remote(p) for a, p in zip(self.actors, parts)])
        self.barrier()
