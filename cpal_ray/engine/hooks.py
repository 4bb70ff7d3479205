"""The hooks of ``engine.fit``: the base class, its priorities and hook points, and the hook that
hands each epoch's checkpoint to a ``save_fn``. Hooks see the ``TrainState``.

``fit`` runs its hooks sorted by ``priority`` (lower first; a stable sort, so hooks of equal
priority keep the order they were given in), as mmengine's ``Hook.priority`` does. The named
priorities, in the order a run needs them::

    PROVIDE  10   hooks that provide what the step and later hooks use (a task's state, its clustering)
    MEASURE  30   hooks that add measurements to the epoch's record (diagnostics)
    NORMAL   50   the caller's hooks (the default)
    RECORD   80   hooks that write the records (TensorBoard, history.json)
    LAST    100   the checkpoint

Hook points (each a no-op here; override what you need)::

    before_train(state, resume)            once, after the model, optimizer and scheduler are
                                           restored from ``resume`` (a loaded checkpoint, or None):
                                           restore or reset what the hook keeps (mmengine's
                                           ``after_load_checkpoint``)
    before_epoch(state)
    after_step(state, step, outputs)       ``outputs``: the task step's terms (``engine.tasks``)
    after_epoch(state, record)             ``record``: the epoch's metrics dict (add to it)
    before_save_checkpoint(state, checkpoint)   rank 0, before the checkpoint goes to ``save_fn``:
                                           put the hook's own state into ``checkpoint``
"""
from __future__ import annotations

from typing import Callable

from cpal_ray.engine.checkpoint import checkpoint_state

PROVIDE, MEASURE, NORMAL, RECORD, LAST = 10, 30, 50, 80, 100


class Hook:
    """Base class: override the hook points you need (module docstring)."""

    priority: int = NORMAL

    def before_train(self, state, resume: dict | None) -> None:
        pass

    def before_epoch(self, state) -> None:
        pass

    def after_step(self, state, step: int, outputs: dict) -> None:
        pass

    def after_epoch(self, state, record: dict) -> None:
        pass

    def before_save_checkpoint(self, state, checkpoint: dict) -> None:
        pass


def by_priority(hooks) -> list[Hook]:
    """The hooks in the order ``fit`` runs them: by ``priority``, ties in the order given."""
    return sorted(hooks, key=lambda hook: hook.priority)


class CheckpointHook(Hook):
    """Hands the epoch's checkpoint (rank 0; None on the other ranks) and record to ``save_fn``.

    ``save_fn(checkpoint, record)`` is called on every rank (Ray's ``report`` is a barrier);
    ``checkpoint`` is ``engine.checkpoint.checkpoint_state`` (the one definition of a checkpoint,
    with the ``sections`` every checkpoint has, None until a hook fills them), completed by every
    hook of ``hooks`` through ``before_save_checkpoint``.
    """

    priority = LAST

    def __init__(self, save_fn: Callable[[dict | None, dict], None], hooks: list[Hook] = (),
                 sections: tuple[str, ...] = ()):
        self.save_fn, self.hooks, self.sections = save_fn, hooks, tuple(sections)

    def after_epoch(self, state, record: dict) -> None:
        checkpoint = None
        if state.rank == 0:
            checkpoint = checkpoint_state(model=state.model, cfg=state.cfg, epoch=state.epoch + 1,
                                          global_step=state.global_step, optimizer=state.optimizer,
                                          scheduler=state.scheduler, metrics=record, sections=self.sections)
            for hook in self.hooks:
                hook.before_save_checkpoint(state, checkpoint)
        self.save_fn(checkpoint, record)
