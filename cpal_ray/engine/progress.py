"""The loader of one epoch, wrapped (torchvision's ``MetricLogger.log_every``, without the
framework): the one place that times data and steps, keeps the loss terms, checks they are
finite, calls the hooks' ``after_step`` and reports progress.

    meter = StepMeter(state, names, hooks)
    for step, batch in meter.log_every(loader):
        ...forward, backward, optimizer step...
        meter.update(values, outputs)   # the step's loss terms, on the device (stacked in ``names``
                                        # order), and what the step returned, for the hooks

No host synchronisation per step: the terms are summed on the device, and read every
``train.log_every`` steps and at the end of the epoch. A non-finite loss raises
``FloatingPointError`` naming the epoch, the step where it first happened and its loss terms (at
the next read, so at most ``log_every - 1`` steps later).

Reporting, from rank 0 only: every ``train.log_every`` steps one log line of at most
``MAX_LINE`` characters (the loss terms averaged since the last line, lr, seconds per step of
data and compute), and a progress bar when a person watches: ``bar_factory`` (plain tqdm on an
interactive terminal by default; a Ray Train worker sets Ray's ``tqdm_ray``, which the driver
draws, when the driver's terminal is interactive, see ``distributed.train_loop``).
"""
from __future__ import annotations

import logging
import re
import time
from typing import Callable

import torch
from cpal_ray.formatting import progress

log = logging.getLogger(__name__)
MAX_LINE = 200  # characters of a log line (longer ones are cut, see ShortLines)
# A Ray worker's message: Ray prints "(RayTrainWorker pid=…) " before it in the driver.
WORKER_LINE = MAX_LINE - 30
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def _terminal_bar(iterable, desc: str, total: int):
    return progress(iterable, desc, total=total)


# (iterable, desc, total) -> an iterable with a bar; ``set_bar_factory`` replaces it.
bar_factory: Callable = _terminal_bar


def set_bar_factory(factory: Callable | None) -> None:
    """Where rank 0's progress bar goes: ``factory(iterable, desc, total)``; None = the default."""
    global bar_factory
    bar_factory = factory or _terminal_bar


class ShortLines(logging.Filter):
    """Cuts the message of a log record to ``limit`` characters (Ray Train logs whole metric
    dicts at INFO, several thousand characters a line) and, with ``plain``, removes colour codes."""

    def __init__(self, limit: int | None = MAX_LINE, plain: bool = False):
        super().__init__()
        self.limit, self.plain = limit, plain

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        short = _COLOUR.sub("", message) if self.plain else message
        if self.limit and len(short) > self.limit:
            short = short[: self.limit - 1] + "…"
        if short != message:
            record.msg, record.args = short, None
        return True


def shorten_log_lines(*logger_names: str, limit: int | None = MAX_LINE, plain: bool = False) -> None:
    """Add ``ShortLines`` to every handler of these loggers ("" = the root), once."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ShortLines) for f in handler.filters):
                handler.addFilter(ShortLines(limit, plain))


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss terms were not all finite."""

    def __init__(self, device, names: tuple[str, ...]):
        self.names = names
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values = torch.zeros(len(names), device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        first = (self.step < 0) & ~torch.isfinite(values).all()
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        self.values = torch.where(first, values, self.values)

    def check(self, epoch: int, rank: int) -> None:
        step = int(self.step)  # the only read: a host sync every log_every steps
        if step >= 0:
            terms = dict(zip(self.names, self.values.tolist()))
            raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step} (rank {rank}): {terms}")


class StepMeter:
    """One epoch's steps of ``state`` (a ``TrainState``): see the module docstring.

    After the loop: ``steps``, ``means()`` (the epoch means of the terms), ``data_seconds`` and
    ``step_seconds`` (the loop body, hooks excluded). On every ``train.log_every``-th step
    ``state.logged`` holds that step's terms and lr for the hooks (None on the others).
    """

    def __init__(self, state, names: tuple[str, ...], hooks=()):
        self.state, self.names, self.hooks = state, tuple(names), list(hooks)
        self.every = max(1, state.cfg.train.log_every)
        self.sums = torch.zeros(len(self.names), device=state.device)
        self.watch = _NonFiniteWatch(state.device, self.names)
        self.steps = 0
        self.data_seconds = self.step_seconds = 0.0
        self._values: torch.Tensor | None = None
        self._outputs: dict = {}
        self._window = (torch.zeros_like(self.sums), 0, 0.0, 0.0)  # sums, steps, data s, step s at the last line

    def update(self, values: torch.Tensor, outputs: dict | None = None) -> None:
        """The loss terms of the step just done (a 1-D tensor in ``names`` order, detached) and the
        step's outputs (its terms dict), which the hooks' ``after_step`` receive."""
        self._values = values
        self._outputs = outputs if outputs is not None else {}

    def means(self) -> list[float]:
        return (self.sums / max(self.steps, 1)).tolist()

    def log_every(self, loader):
        """Yield (step, batch) for the epoch's ``state.steps_per_epoch`` steps (see the class)."""
        state = self.state
        state.logged = None
        total = state.steps_per_epoch
        bar = bar_factory(loader, f"epoch {state.epoch}", total) if state.rank == 0 else None
        batches = iter(bar if bar is not None else loader)
        try:
            t_data = time.perf_counter()
            for step, batch in enumerate(batches):
                if step >= total:
                    break
                t_step = time.perf_counter()
                self.data_seconds += t_step - t_data
                self._values = None
                yield step, batch
                if self._values is None:
                    raise RuntimeError(f"step {step}: the loop did not give StepMeter.update() the loss terms")
                self.step_seconds += time.perf_counter() - t_step
                self._end_step(step, bar)
                t_data = time.perf_counter()
            self.watch.check(state.epoch, state.rank)
        finally:
            if bar is not None and hasattr(bar, "close"):
                bar.close()

    def _end_step(self, step: int, bar) -> None:
        state, values = self.state, self._values
        self.watch.update(step, values)
        self.sums += values
        self.steps += 1
        state.logged = None
        if step % self.every == 0:
            self.watch.check(state.epoch, state.rank)
            lr = state.optimizer.param_groups[0]["lr"]
            state.logged = dict(zip(self.names, values.tolist()), lr=lr)  # hooks (tracking) see this step's values
            if state.rank == 0:
                self._report(step, lr, bar)
        for hook in self.hooks:
            hook.after_step(state, step, self._outputs)

    def _report(self, step: int, lr: float, bar) -> None:
        """Rank 0's line: the terms averaged since the last line, lr, seconds per step."""
        sums, steps, data_s, step_s = self._window
        n = max(self.steps - steps, 1)
        means = ((self.sums - sums) / n).tolist()
        terms = " ".join(f"{k} {v:.4f}" for k, v in zip(self.names, means))
        line = (f"epoch {self.state.epoch} step {step + 1}/{self.state.steps_per_epoch}: {terms} lr {lr:.2e} "
                f"data {(self.data_seconds - data_s) / n:.3f}s step {(self.step_seconds - step_s) / n:.3f}s")
        log.info(line[:MAX_LINE])
        self._window = (self.sums.clone(), self.steps, self.data_seconds, self.step_seconds)
        if bar is not None and hasattr(bar, "set_description"):
            bar.set_description(f"epoch {self.state.epoch} {self.names[0]} {means[0]:.4f}")
