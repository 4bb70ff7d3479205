"""The hooks of ``engine.fit`` (call order in its docstring): the base class, the clustering of
the bank on schedule, and the checkpoint handed to a ``save_fn``. They see the ``TrainState``."""
from __future__ import annotations

from typing import Callable

from cpal_ray.engine.checkpoint import checkpoint_state
from cpal_ray.engine.comm import all_gather_object


class Hook:
    """Base class: override what you need. ``record`` is the epoch's metrics dict (add to it)."""

    def before_epoch(self, state) -> None:
        pass

    def after_step(self, state, step: int) -> None:
        pass

    def after_epoch(self, state, record: dict) -> None:
        pass


class ClusterHook(Hook):
    """Eq. 5 on schedule: after step ``warmup_steps`` of epoch 0 (0 = never) and at every epoch's end.

    Every rank calls ``bank.cluster`` at the same point (the bank runs k-means once per tag and
    all ranks get the same version). Adds ``context_versions`` (one per rank) and the bank's
    ``stats()`` to the record.
    """

    def __init__(self, warmup_steps: int = 0):
        self.warmup_steps = warmup_steps

    def _cluster(self, state, tag: str) -> None:
        context = state.bank.cluster(tag)
        if context is not None:
            state.context = context

    def after_step(self, state, step: int) -> None:
        if self.warmup_steps > 0 and state.epoch == 0 and step + 1 == self.warmup_steps:
            self._cluster(state, "warmup")

    def after_epoch(self, state, record: dict) -> None:
        self._cluster(state, f"epoch{state.epoch + 1}")
        record["context_versions"] = all_gather_object(state.context.version if state.context else 0)
        record.update(state.bank.stats())


class CheckpointHook(Hook):
    """Hands the epoch's checkpoint (rank 0; None on the other ranks) and record to ``save_fn``.

    ``save_fn(checkpoint, record)`` is called on every rank (Ray's ``report`` is a barrier);
    ``checkpoint`` is ``engine.checkpoint.checkpoint_state``, the one definition of a checkpoint.
    """

    def __init__(self, save_fn: Callable[[dict | None, dict], None]):
        self.save_fn = save_fn

    def after_epoch(self, state, record: dict) -> None:
        checkpoint = None
        if state.rank == 0:
            checkpoint = checkpoint_state(model=state.model, cfg=state.cfg, epoch=state.epoch + 1,
                                          global_step=state.global_step, optimizer=state.optimizer,
                                          scheduler=state.scheduler, bank=state.bank, metrics=record)
        self.save_fn(checkpoint, record)
