"""PrototypeBank: FIFO order and capacity, idempotent keyed pushes, state round trip, k-means."""
import numpy as np
import pytest
import torch

from cpal_ray.cpal import Context, PrototypeBank, kmeans, kmeans_inertia

pytestmark = pytest.mark.unit


def vec(*vals):
    return np.array([vals], dtype=np.float32)


def test_fifo_order_and_capacity():
    bank = PrototypeBank(num_classes=2, dim=1, capacity=3, num_clusters=1)
    for i in range(5):
        assert bank.push(("e0", i, 0), [0], vec(float(i)))
    assert bank.entries(0)[:, 0].tolist() == [2.0, 3.0, 4.0]  # oldest two evicted, order kept
    assert bank.counts().tolist() == [3, 0] and bank.pushed().tolist() == [5, 0]
    assert bank.entries(1).shape == (0, 1)


def test_same_key_twice_stores_once():
    bank = PrototypeBank(num_classes=3, dim=2, capacity=10, num_clusters=2)
    protos = np.ones((2, 2), dtype=np.float32)
    assert bank.push((1, 7, 0), [0, 2], protos) is True
    assert bank.push((1, 7, 0), [0, 2], protos) is False
    assert bank.push((1, 7, 1), [0], protos[:1]) is True  # another rank: a different key
    assert bank.counts().tolist() == [2, 0, 1] and bank.has_key((1, 7, 0))


def test_bad_pushes_raise_and_store_nothing():
    bank = PrototypeBank(num_classes=2, dim=2, capacity=4, num_clusters=2)
    with pytest.raises(ValueError, match="dim"):
        bank.push("a", [0], np.ones((1, 3)))
    with pytest.raises(ValueError, match="class ids"):
        bank.push("b", [2], np.ones((1, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        bank.push("c", [0], np.array([[np.nan, 0.0]]))
    assert bank.counts().sum() == 0 and not bank.keys


def test_state_round_trip_is_exact_and_weights_only_loadable(tmp_path):
    rng = np.random.default_rng(0)
    bank = PrototypeBank(num_classes=3, dim=4, capacity=5, num_clusters=2, spherical=False)
    for i in range(9):
        bank.push((0, i, i % 2), [i % 3], rng.normal(size=(1, 4)))
    context = bank.cluster("epoch1")
    path = tmp_path / "bank.pt"
    torch.save(bank.state_dict(), path)
    restored = PrototypeBank(num_classes=3, dim=4, capacity=5, num_clusters=2, spherical=False)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for c in range(3):
        np.testing.assert_array_equal(restored.entries(c), bank.entries(c))
    assert restored.keys == bank.keys and restored.version == bank.version == 1
    assert restored.context.version == 1 and restored.cluster("epoch1") is restored.context  # tag restored too
    torch.testing.assert_close(restored.context.prototypes, context.prototypes, rtol=0, atol=0)
    torch.testing.assert_close(restored.context.counts, context.counts, rtol=0, atol=0)
    # The restored bank behaves identically afterwards (FIFO head restored too).
    for b in (bank, restored):
        b.push("next", [0, 1], np.full((2, 4), 7.0))
    for c in range(3):
        np.testing.assert_array_equal(restored.entries(c), bank.entries(c))
    with pytest.raises(ValueError, match="shape"):
        PrototypeBank(num_classes=4, dim=4, capacity=5, num_clusters=2).load_state_dict(bank.state_dict())
    restored.load_state_dict(None)  # a run starting from scratch empties the bank
    assert restored.counts().sum() == 0 and not restored.keys and restored.context is None and restored.version == 0


def test_kmeans_recovers_well_separated_blobs():
    rng = np.random.default_rng(1)
    centres = np.array([[10, 0, 0], [0, 10, 0], [0, 0, 10], [-10, -10, -10]], dtype=np.float32)
    x = np.concatenate([c + 0.1 * rng.normal(size=(50, 3)) for c in centres]).astype(np.float32)
    cents, device = kmeans(x, 4, niter=25, seed=3)
    assert device in ("cpu", "gpu")
    dist = np.linalg.norm(cents[:, None] - centres[None], axis=-1)
    assert sorted(dist.argmin(1).tolist()) == [0, 1, 2, 3] and dist.min(1).max() < 0.2
    assert kmeans_inertia(x, cents) < kmeans_inertia(x, centres[:1].repeat(4, 0))


def test_cluster_small_and_empty_classes_and_tag_runs_once():
    rng = np.random.default_rng(2)
    bank = PrototypeBank(num_classes=3, dim=2, capacity=100, num_clusters=4, spherical=False)
    for i in range(40):
        bank.push(("a", i), [0], rng.normal(size=(1, 2)))
    bank.push(("b", 0), [1, 1], np.array([[1.0, 2.0], [3.0, 4.0]]))  # fewer entries than N_p
    first = bank.cluster("epoch1")
    ctx = first.prototypes.numpy()
    assert first.counts.tolist() == [4, 2, 0] and first.version == 1
    np.testing.assert_allclose(ctx[1, :2], [[1.0, 2.0], [3.0, 4.0]])  # used as they are
    assert np.abs(ctx[2]).sum() == 0 and np.abs(ctx[1, 2:]).sum() == 0
    bank.push(("c", 0), [2], np.ones((1, 2)))
    again = bank.cluster("epoch1")  # same tag: no new clustering
    assert again.version == 1 and again.counts.tolist() == [4, 2, 0]
    third = bank.cluster("epoch2")
    assert third.version == 2 and third.counts.tolist() == [4, 2, 1]


def test_empty_bank_has_no_context_and_context_state_round_trips():
    bank = PrototypeBank(num_classes=2, dim=3, capacity=4, num_clusters=2)
    assert bank.cluster("epoch1") is None and bank.version == 0  # nothing to cluster yet
    assert Context.from_state(None) is None
    zero = Context(torch.zeros(2, 2, 3), torch.zeros(2, dtype=torch.long), 1)
    assert Context.from_state(zero.state_dict()) is None  # no class with prototypes = no context
    bank.push("k", [1], np.ones((1, 3)))
    ctx = bank.cluster("epoch1")
    assert ctx.counts.tolist() == [0, 1]
    back = Context.from_state(ctx.state_dict())
    assert back.version == ctx.version and torch.equal(back.prototypes, ctx.prototypes)


def test_spherical_clustering_gives_unit_centroids():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cents, _ = kmeans(x, 5, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("capacity", [1, 3, 50])
def test_a_packed_batch_of_pushes_equals_pushing_one_by_one(capacity):
    """push_batch (the Ray client's wire format) is sequential ``push`` in fewer operations:
    same answers, same FIFO contents and order, also when a batch overflows a class and repeats a key."""
    from cpal_ray.cpal.bank import pack_pushes

    rng = np.random.default_rng(capacity)
    one = PrototypeBank(num_classes=4, dim=3, capacity=capacity, num_clusters=1)
    batched = PrototypeBank(num_classes=4, dim=3, capacity=capacity, num_clusters=1)
    items = [(("e", int(rng.integers(0, 25)), 0), rng.integers(0, 4, m), rng.normal(size=(m, 3)).astype(np.float32))
             for m in rng.integers(0, 5, 60)]
    expected = [one.push(*item) for item in items]
    got = batched.push_batch(*pack_pushes(items[:20])) + batched.push_many(items[20:])
    assert got == expected and False in got  # some keys repeat
    a, b = one.state_dict(), batched.state_dict()
    for k in ("data", "size", "head", "pushed"):
        assert torch.equal(a[k], b[k]), k
    assert a["keys"] == b["keys"]
    with pytest.raises(ValueError, match="push e-99-0: class ids"):
        batched.push_many([(("e", 98, 0), [1], np.zeros((1, 3))), (("e", 99, 0), [0, 7], np.zeros((2, 3)))])
    assert not batched.has_key(("e", 98, 0))  # a bad batch stores nothing
