"""Global-batch sharding: N workers together see exactly the batches one process would.

A single process with batch G takes the global permutation in chunks of G. With N workers,
rank r takes slice [r*G/N, (r+1)*G/N) of each chunk, so the union of the N local batches of a
step *is* the single-process batch of that step and DDP's gradient average equals the
single-process gradient (up to float summation order). torch's DistributedSampler deals
indices round-robin instead, which changes the composition of every global batch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's list of indices for each global batch.

    Args:
        num_items: dataset length.
        global_batch: G, summed over workers (must be divisible by num_replicas).
        num_replicas, rank: world size and this worker's rank.
        seed: base seed; the permutation of epoch e uses seed + e (call ``set_epoch``).
        shuffle: permute each epoch (False = dataset order).
        max_steps: stop after this many batches (0 = all full global batches).
    Batches are full global batches only (the remainder is dropped) unless the dataset is
    smaller than one global batch, in which case indices wrap around to fill one batch.
    """

    def __init__(self, num_items: int, global_batch: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, max_steps: int = 0):
        if global_batch % num_replicas:
            raise ValueError(f"global batch {global_batch} is not divisible by {num_replicas} workers")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if num_items < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_items, self.global_batch, self.world, self.rank = num_items, global_batch, num_replicas, rank
        self.local_batch = global_batch // num_replicas
        self.seed, self.shuffle, self.max_steps, self.epoch = seed, shuffle, max_steps, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = max(1, self.num_items // self.global_batch)
        return min(n, self.max_steps) if self.max_steps else n

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        while len(order) < self.global_batch:
            order = order + order[: self.global_batch - len(order)]
        lo = self.rank * self.local_batch
        for b in range(len(self)):
            chunk = order[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[lo: lo + self.local_batch]
