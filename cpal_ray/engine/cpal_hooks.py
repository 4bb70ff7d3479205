"""CPAL's part of training the CAM network, as one hook: the support bank and the L_self shares.

The generic engine (``fit``, the loop, checkpoints, ``fit_local``) knows nothing of CPAL; the task
registry (``engine.tasks.task_hooks``) gives the CAM network a ``CPALHook``, with the in-process
bank (``cpal.shards.make_bank``) for a local run and a ``BankClient`` (``distributed.bank_actor``)
for a Ray Train worker. At its hook points:

    before_train     restore the bank from the resume checkpoint's ``bank`` (or empty it) and set
                     the context the step uses (``state.extras["context"]``; the bank itself is
                     ``state.extras["bank"]``, both handed back in ``FitResult``)
    after_step       push the step's instance prototypes (keyed (epoch, step, rank)) and count them
                     per class; count the images and (image, class) pairs in L_self; Eq. 5 on the
                     warm-up step ``cpal.warmup_cluster_steps`` of epoch 0
    after_epoch      the record's L_self shares, ``bank_at_start`` (first epoch of this attempt),
                     ``pushed_per_rank``; Eq. 5 for the next epoch (tag ``epoch<e+1>``), every rank's
                     ``context_versions`` and the bank's ``stats()``
    before_save_checkpoint   the bank's ``state_dict()`` as the checkpoint's ``bank``

Its priority is ``PROVIDE``: the clustering comes before the diagnostics, the caller's hooks, the
records and the checkpoint, so that the checkpoint of epoch e holds the context its next epoch
(and inference) uses. Without a bank (the BCE baseline, SIPE's instance arm) it only counts.
"""
from __future__ import annotations

import numpy as np
import torch

from cpal_ray.cpal.bank import Bank, Context
from cpal_ray.engine.comm import all_gather_object
from cpal_ray.engine.hooks import PROVIDE, Hook

SELF_COUNTS = ("self_images", "pairs", "self_pairs")  # the step's terms counted for the L_self shares


def push_prototypes(bank: Bank, key: tuple, protos: torch.Tensor | None, valid: torch.Tensor | None) -> dict[int, int]:
    """Send the valid instance prototypes of one step to the bank; returns {class: count} pushed.

    protos: (B, N, D); valid: (B, N) bool. One device-to-host copy (the bank lives on the host).
    """
    if bank is None or protos is None:
        return {}
    idx = valid.nonzero(as_tuple=False).cpu()  # (M, 2): (image, class)
    class_ids = idx[:, 1].numpy()
    vectors = protos.detach()[idx[:, 0], idx[:, 1]].cpu().numpy().astype(np.float32)
    bank.push(key, class_ids, vectors)
    u, c = np.unique(class_ids, return_counts=True)
    return {int(a): int(b) for a, b in zip(u, c)}


def checkpoint_context(state: dict) -> Context | None:
    """The context prototypes a checkpoint holds (inside its bank state), or None."""
    bank = state.get("bank")
    return Context.from_state(bank["context"]) if bank else None


class CPALHook(Hook):
    """See the module docstring. ``bank``: a ``cpal.bank.Bank`` or None; ``warmup_steps``: the
    step of epoch 0 after which the bank is clustered early (0 = never)."""

    priority = PROVIDE

    def __init__(self, bank: Bank | None, warmup_steps: int = 0):
        self.bank, self.warmup_steps = bank, warmup_steps
        self.bank_at_start: dict | None = None
        self.pushed: dict[int, int] = {}
        self.counts: torch.Tensor | None = None

    def before_train(self, state, resume: dict | None) -> None:
        state.extras["bank"], state.extras["context"] = self.bank, None
        if self.bank is None:
            return
        bank_state = resume.get("bank") if resume is not None else None
        self.bank.load_state_dict(bank_state)  # the bank always equals the state saved with the model
        state.extras["context"] = Context.from_state(bank_state["context"]) if bank_state else None
        # What this attempt starts from, in its first epoch's record: a test (and a person reading a
        # resumed run's history) sees that the bank came back, not only that its keys are unique.
        restored = self.bank.stats()
        self.bank_at_start = {"bank_keys": restored["bank_keys"], "bank_entries": int(sum(restored["bank_pushed"])),
                              "context_version": restored["context_version"]}

    def before_epoch(self, state) -> None:
        self.pushed = {}
        self.counts = torch.zeros(len(SELF_COUNTS), device=state.device)  # summed on the device: no sync

    def after_step(self, state, step: int, outputs: dict) -> None:
        for c, n in push_prototypes(self.bank, (state.epoch, step, state.rank), outputs.get("protos"),
                                    outputs.get("proto_valid")).items():
            self.pushed[c] = self.pushed.get(c, 0) + n
        if "pairs" in outputs:
            self.counts += torch.stack([torch.as_tensor(outputs[k], dtype=self.counts.dtype, device=self.counts.device)
                                        for k in SELF_COUNTS])
        if self.bank is not None and self.warmup_steps > 0 and state.epoch == 0 and step + 1 == self.warmup_steps:
            self._cluster(state, "warmup")

    def after_epoch(self, state, record: dict) -> None:
        self_images, pairs, self_pairs = self.counts.tolist()
        images = record["images"]
        context = state.extras.get("context")
        record.update(self_images=int(self_images), self_image_share=self_images / max(images, 1),
                      self_class_share=self_pairs / max(pairs, 1),
                      context_version=context.version if context else 0)
        if self.bank is not None and record["epoch"] == record["start_epoch"]:
            record["bank_at_start"] = self.bank_at_start
        record["pushed_per_rank"] = [{str(k): v for k, v in p.items()} for p in all_gather_object(self.pushed)]
        if self.bank is None:
            return
        self._cluster(state, f"epoch{state.epoch + 1}")
        context = state.extras["context"]
        record["context_versions"] = all_gather_object(context.version if context else 0)
        record.update(self.bank.stats())

    def before_save_checkpoint(self, state, checkpoint: dict) -> None:
        checkpoint["bank"] = self.bank.state_dict() if self.bank is not None else None

    def _cluster(self, state, tag: str) -> None:
        """Every rank calls ``bank.cluster`` at the same point: the bank runs k-means once per tag."""
        context = self.bank.cluster(tag)
        if context is not None:
            state.extras["context"] = context
