"""The support bank as a Ray actor, and the worker-side client that pushes to it.

``BankActor`` wraps a ``PrototypeBank`` and adds no logic beyond wiring, plus one guard: an
actor restarted by Ray (``max_restarts``) comes back *empty*, so it refuses pushes
(``BankLostError``) until the train loop restores it from the last checkpoint. The failed push
fails the worker, Ray Train restarts the run from that checkpoint, and rank 0 loads the
checkpoint's bank state into the actor: nothing lost, nothing stored twice.

How workers find it: by name. The driver creates ``cpal-bank-<run name>`` in the namespace
``cpal-ray`` before ``TorchTrainer.fit``; the train-loop config carries the name, and each
worker calls ``ray.get_actor(name, namespace)``. A named actor survives worker restarts (the
driver owns it) and one name per run lets Tune trials each have their own bank.

Traffic: per step a worker sends M (valid instance prototypes in its local batch, about 1–2
per image) x D float32 values + M int64 class ids + a short key: 4·M·D + 8·M + ~40 bytes
(D=128, local batch 2: about 1.5 KB). Once per epoch each worker fetches the context
prototypes, N x N_p x D float32 (VOC: 20 x 50 x 128 x 4 = 512 KB).
"""
from __future__ import annotations

import logging
from collections import deque

import numpy as np
import ray

from cpal_ray.config import Config, from_dict
from cpal_ray.cpal.bank import Context, PrototypeBank
from cpal_ray.distributed.runtime import NAMESPACE

log = logging.getLogger(__name__)


class BankLostError(RuntimeError):
    """The bank actor was restarted and lost its state; the run must resume from a checkpoint."""


def bank_actor_name(run_name: str) -> str:
    return f"cpal-bank-{run_name}"


class BankActor:
    """Thin actor around ``PrototypeBank`` (all methods run one at a time, in call order)."""

    def __init__(self, cfg_dict: dict, dim: int, prefer_gpu: bool):
        self.bank = PrototypeBank.from_config(from_dict(cfg_dict), dim, prefer_gpu=prefer_gpu)
        if prefer_gpu:
            from cpal_ray.cpal.kmeans import faiss_device

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

    def cluster(self, tag: str) -> Context | None:
        self._guard()
        return self.bank.cluster(tag)

    def stats(self) -> dict:
        return {**self.bank.stats(), "restarted": self.restarted, "bank_node": ray.get_runtime_context().get_node_id()}

    def state_dict(self) -> dict:
        return self.bank.state_dict()

    def load_state_dict(self, state: dict | None) -> int:
        """Restore from a checkpoint's bank state (None = start empty); re-enables pushes."""
        self.bank.load_state_dict(state)
        self.restarted = False
        return self.bank.version


def create_bank_actor(cfg: Config, name: str):
    """Create (or reuse) the run's named bank actor. Resources from ``cfg.dist``; restarts allowed,
    task retries not (a push to a restarted actor must fail, not land in an empty bank)."""
    from cpal_ray.models import embed_dim

    opts = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=cfg.dist.bank_cpus,
                max_restarts=-1, max_task_retries=0)
    if cfg.dist.bank_gpus > 0:
        opts["num_gpus"] = cfg.dist.bank_gpus
    actor = ray.remote(BankActor).options(**opts).remote(cfg.to_dict(), embed_dim(cfg.model), cfg.dist.bank_gpus > 0)
    ray.get(actor.ready.remote())
    return actor


def remove_bank_actor(name: str) -> bool:
    """Kill the run's bank actor if it exists (no restart); True if one was removed."""
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


class BankClient:
    """The bank interface of ``cpal_ray.cpal.bank`` for a worker of a Ray Train group, over the actor.

    ``push`` is fire-and-forget with at most ``max_in_flight`` pending (then it waits for the
    oldest). Errors of a push (``BankLostError``, a dead actor) surface at the next push or at
    ``flush`` and fail the worker, which is what triggers recovery from the checkpoint.
    ``cluster`` and ``load_state_dict`` are collective: every rank calls them at the same point;
    pushes are flushed and the ranks meet at ``barrier`` first, so the clustering sees every
    rank's pushes, and only rank 0 restores the state.
    """

    def __init__(self, actor, max_in_flight: int = 4, rank: int = 0, barrier=lambda: None):
        self.actor = actor
        self.max_in_flight = max_in_flight
        self.rank = rank
        self.barrier = barrier
        self._pending: deque = deque()
        self.bytes_sent = 0
        self.pushes = 0

    def push(self, key, class_ids, protos) -> None:
        class_ids = np.asarray(class_ids, dtype=np.int64)
        protos = np.asarray(protos, dtype=np.float32)
        self._pending.append(self.actor.push.remote(key, class_ids, protos))
        self.bytes_sent += class_ids.nbytes + protos.nbytes + len(str(key))
        self.pushes += 1
        while len(self._pending) > self.max_in_flight:
            ray.get(self._pending.popleft())

    def flush(self) -> None:
        while self._pending:
            ray.get(self._pending.popleft())

    def cluster(self, tag: str) -> Context | None:
        self.flush()
        self.barrier()
        return ray.get(self.actor.cluster.remote(tag))

    def stats(self) -> dict:
        return {**ray.get(self.actor.stats.remote()),
                "bank_bytes_per_step": self.bytes_sent / max(self.pushes, 1)}

    def state_dict(self) -> dict:
        self.flush()
        return ray.get(self.actor.state_dict.remote())

    def load_state_dict(self, state: dict | None) -> None:
        if self.rank == 0:
            ray.get(self.actor.load_state_dict.remote(state))
        self.barrier()
