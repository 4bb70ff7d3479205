"""A class-sharded bank is the unsharded bank: same contexts, stats and checkpoints, in process and on Ray.

Also the two other scale features of the bank client: pushes batched every n steps (one call per
shard, one key per step) and the context broadcast through the object store (one ``ray.put``
per clustering, every worker reads the same object).
"""
import numpy as np
import pytest
import torch

from cpal_ray.config import Config, ConfigError
from cpal_ray.cpal.bank import PrototypeBank
from cpal_ray.cpal.shards import ShardedBank, make_bank, route_pushes, shard_classes

NUM_CLASSES, DIM = 20, 8


def cfg_with(shards: int) -> Config:
    return Config().replace(**{"data.dataset": "voc", "cpal.bank_size": 30, "cpal.num_clusters": 4,
                               "cpal.top_k": 3, "cpal.bank_shards": shards, "cpal.kmeans_redo": 1})


def pushes(n: int, seed: int = 0) -> list:
    """n steps' pushes: 0-3 prototypes of random classes each (some steps push nothing)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = int(rng.integers(0, 4))
        out.append((("e0", i, 0), rng.integers(0, NUM_CLASSES, m), rng.normal(size=(m, DIM)).astype(np.float32)))
    return out


def same_state(a: dict, b: dict) -> None:
    assert a["shape"] == b["shape"] and a["keys"] == b["keys"]
    assert (a["version"], a["cluster_tag"]) == (b["version"], b["cluster_tag"])
    for k in ("data", "size", "head", "pushed"):
        assert torch.equal(a[k], b[k]), k
    assert (a["context"] is None) == (b["context"] is None)
    if a["context"] is not None:
        assert torch.equal(a["context"]["prototypes"], b["context"]["prototypes"])
        assert torch.equal(a["context"]["counts"], b["context"]["counts"])


@pytest.mark.unit
def test_shards_partition_the_classes_and_routing_keeps_every_prototype():
    groups = shard_classes(NUM_CLASSES, 3)
    assert sorted(np.concatenate(groups).tolist()) == list(range(NUM_CLASSES))
    assert groups[1].tolist() == [1, 4, 7, 10, 13, 16, 19]
    items = pushes(50)
    parts = route_pushes(items, groups, NUM_CLASSES)
    for key, cls, protos in items:
        got = [(groups[s][c], p) for s, part in enumerate(parts) for k, cs, ps in part if k == key
               for c, p in zip(cs, ps)]
        assert sorted(int(c) for c, _ in got) == sorted(cls.tolist())
        assert len(got) == len(cls)
        assert [s for s, part in enumerate(parts) for k, _, _ in part if k == key] == [0, 1, 2]  # every shard, every key
    with pytest.raises(ValueError, match="bank_shards"):
        shard_classes(4, 5)
    with pytest.raises(ConfigError, match="cpal.bank_shards"):
        Config().replace(**{"data.dataset": "voc", "cpal.bank_shards": 21})


@pytest.mark.unit
@pytest.mark.parametrize("shards", [2, 3, 20])
def test_sharded_bank_equals_one_bank(shards):
    one, many = make_bank(cfg_with(1), DIM, prefer_gpu=False), make_bank(cfg_with(shards), DIM, prefer_gpu=False)
    assert isinstance(one, PrototypeBank) and isinstance(many, ShardedBank)
    for key, cls, protos in pushes(400):
        assert one.push(key, cls, protos) == many.push(key, cls, protos)
    assert many.push(("e0", 5, 0), [1], np.zeros((1, DIM))) is False  # a retried step stores nothing,
    assert many.push(("e0", 6, 0), [0, 19], np.zeros((2, DIM))) is False  # whichever shards its classes are in
    a, b = one.cluster("epoch-1"), many.cluster("epoch-1")
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.counts, b.counts) and a.version == b.version
    sa, sb = one.stats(), many.stats()
    for k in ("bank_fill", "bank_pushed", "bank_keys", "context_version", "context_counts"):
        assert sa[k] == sb[k], k
    same_state(one.state_dict(), many.state_dict())


@pytest.mark.unit
def test_checkpoints_restore_across_shard_counts():
    one = make_bank(cfg_with(1), DIM, prefer_gpu=False)
    for key, cls, protos in pushes(300):
        one.push(key, cls, protos)
    one.cluster("epoch-1")
    four = make_bank(cfg_with(4), DIM, prefer_gpu=False)
    four.load_state_dict(one.state_dict())  # an S = 1 checkpoint into 4 shards
    same_state(four.state_dict(), one.state_dict())
    for key, cls, protos in pushes(300):  # the same steps again: every shard ignores them
        assert four.push(key, cls, protos) is False
    more = pushes(40, seed=1)
    more = [(("e1",) + k[1:], c, p) for k, c, p in more]
    for key, cls, protos in more:
        one.push(key, cls, protos)
        four.push(key, cls, protos)
    a, b = one.cluster("epoch-2"), four.cluster("epoch-2")
    assert torch.equal(a.prototypes, b.prototypes) and a.version == b.version == 2
    back = make_bank(cfg_with(1), DIM, prefer_gpu=False)
    back.load_state_dict(four.state_dict())  # and 4 shards into S = 1
    same_state(back.state_dict(), one.state_dict())
    four.load_state_dict(None)
    assert four.stats()["bank_keys"] == 0 and sum(four.stats()["bank_fill"]) == 0


@pytest.mark.ray
@pytest.mark.parametrize("shards,push_every", [(1, 4), (3, 4)])
def test_ray_client_batches_pushes_and_matches_the_in_process_bank(ray_start_2_cpus, shards, push_every):
    ray = ray_start_2_cpus
    from cpal_ray.distributed.bank_actor import BankClient, bank_actor_names, create_bank_actors, remove_bank_actor

    cfg = cfg_with(shards).replace(**{"model.proj_dim": DIM})
    names = bank_actor_names(f"shards-test-{shards}", shards)
    actors = create_bank_actors(cfg, names)
    try:
        client = BankClient(actors, max_in_flight=2, push_every=push_every, num_classes=NUM_CLASSES)
        local = make_bank(cfg, DIM, prefer_gpu=False)
        steps = pushes(50)
        for key, cls, protos in steps[:3]:
            client.push(key, cls, protos)
        assert client.calls == 0  # fewer than push_every steps: still buffered
        for key, cls, protos in steps[3:]:
            client.push(key, cls, protos)
        for key, cls, protos in steps:
            local.push(key, cls, protos)
        a, b = client.cluster("epoch-1"), local.cluster("epoch-1")  # flushes the buffer first
        assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.counts, b.counts)
        # One call per shard per batch of push_every steps.
        assert client.calls == shards * -(-len(steps) // push_every)
        stats = client.stats()
        assert stats["bank_keys"] == len(steps) == local.stats()["bank_keys"]
        assert stats["bank_fill"] == local.stats()["bank_fill"]
        same_state(client.state_dict(), local.state_dict())
        # Broadcast: every caller of a clustered tag gets the same object, put once.
        first, second = (ray.get(actors[0].context_ref.remote("epoch-1")) for _ in range(2))
        assert first[0].hex() == second[0].hex()
        client.load_state_dict(None)
        assert client.stats()["bank_keys"] == 0 and client.cluster("epoch-2") is None
    finally:
        for name in names:
            remove_bank_actor(name)


def test_every_bank_implements_the_one_bank_interface():
    """The in-process bank, its shards and the Ray client are one ``Bank``: the same methods with
    the same parameters, defaults and return types (isinstance alone checks only the names)."""
    import inspect

    from cpal_ray.cpal.bank import Bank
    from cpal_ray.distributed.bank_actor import BankClient

    one, many = make_bank(cfg_with(1), DIM, prefer_gpu=False), make_bank(cfg_with(4), DIM, prefer_gpu=False)
    client = BankClient([object()])  # not connected: only its interface is looked at
    assert all(isinstance(bank, Bank) for bank in (one, many, client))
    methods = [m for m in ("push", "cluster", "state_dict", "load_state_dict", "stats") if hasattr(Bank, m)]
    assert len(methods) == 5
    for name in methods:
        want = inspect.signature(getattr(Bank, name))
        for cls in (PrototypeBank, ShardedBank, BankClient):
            got = inspect.signature(getattr(cls, name))
            assert [(p.name, p.kind, p.default, p.annotation) for p in got.parameters.values()] == \
                [(p.name, p.kind, p.default, p.annotation) for p in want.parameters.values()], (cls.__name__, name)
            assert got.return_annotation == want.return_annotation, (cls.__name__, name)
    assert one.push("k", [0], np.ones((1, DIM))) is True and one.push("k", [0], np.ones((1, DIM))) is False
    assert many.push("k", [0], np.ones((1, DIM))) is True and many.push("k", [0], np.ones((1, DIM))) is False
