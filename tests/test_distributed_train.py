"""Ray Train + bank actor: 2 workers, exact bank bookkeeping, equivalence, faults and resume.

Tolerance of the 1-vs-2-worker comparison: both runs see the same global batches (the
GlobalBatchSampler) with per-item augmentation seeded by (seed, epoch, index), frozen
BatchNorm, and DDP averages gradients, so the BCE gradient is the same up to float summation
order. Two parts of CPAL are per-worker by design: the alignment shift delta_n (Eq. 12) uses the
worker's local batch, and L_self is averaged per worker before DDP averages the workers. So
losses agree closely but not bitwise: we allow 10 % relative on the mean epoch loss and
0.10 absolute on the seed mIoU (tiny model, 16 val images).

A lost worker (a whole node, in fact) and `ray job submit` are proven on a multi-node cluster
with the checkpoints in a bucket: tests/test_cluster.py (`pytest -m cluster`).
"""
import json

import numpy as np
import pytest
import torch

from cpal_ray.config import load_config
from cpal_ray.engine import load_checkpoint

pytestmark = pytest.mark.ray


def cfg_for(tmp, name, **over):
    base = {"train.storage_path": str(tmp), "train.name": name, "train.epochs": 2, "train.log_every": 100,
            "dist.num_workers": 2, "data.synthetic_images": 32, "cpal.warmup_cluster_steps": 0}
    base.update(over)
    return load_config("configs/synthetic_tiny.yaml", base)


def expected_keys(epochs, steps, ranks):
    return {f"{e}-{s}-{r}" for e in range(epochs) for s in range(steps) for r in range(ranks)}


@pytest.fixture(scope="module")
def two_worker_run(ray_start_2_cpus, tmp_path_factory):
    from cpal_ray.distributed.trainer import run_training

    tmp = tmp_path_factory.mktemp("runs")
    cfg = cfg_for(tmp, "two")
    return cfg, run_training(cfg)


def test_two_workers_bank_holds_exactly_what_was_pushed(two_worker_run):
    cfg, res = two_worker_run
    hist = res.history
    assert [h["epoch"] for h in hist] == [0, 1]
    state = load_checkpoint(res.final_dir)
    bank = state["bank"]
    steps = hist[0]["steps"]
    assert set(bank["keys"]) == expected_keys(2, steps, 2)  # every (epoch, step, rank) once
    pushed = [0] * cfg.data.num_classes
    for h in hist:
        for per_rank in h["pushed_per_rank"]:
            for c, n in per_rank.items():
                pushed[int(c)] += n
    assert bank["pushed"].tolist() == pushed and sum(pushed) > 0
    assert bank["size"].tolist() == [min(p, cfg.cpal.bank_size) for p in pushed]  # FIFO capacity
    for h in hist:  # every rank used the same context version, one new clustering per epoch
        assert len(set(h["context_versions"])) == 1
    assert hist[0]["context_versions"][0] >= 1 and hist[1]["context_versions"][0] == hist[0]["context_versions"][0] + 1
    weights = torch.load(res.final_dir / "model.pt", weights_only=True)
    assert "classifier.weight" in weights
    assert json.loads((res.final_dir / "summary.json").read_text())["epochs_completed"] == 2


def test_matches_single_worker_with_same_global_batch(two_worker_run, tmp_path):
    from cpal_ray.data import build_dataset
    from cpal_ray.distributed.trainer import run_training
    from cpal_ray.engine import checkpoint_context, fit_local
    from cpal_ray.inference.evaluate import evaluate_seeds
    from cpal_ray.inference.multiscale import multiscale_cams
    from cpal_ray.models import build_model

    cfg2, res2 = two_worker_run
    cfg1 = cfg_for(tmp_path, "one", **{"dist.num_workers": 1, "dist.cpus_per_worker": 1.0})
    res1 = run_training(cfg1)
    # Paper schedule (no warm-up): the bank is empty at the start of epoch 0, so epoch 0 is BCE
    # only; the clustering at its end gives epoch 1 context prototypes and L_self runs.
    assert res1.history[0]["self"] == 0.0 and res1.history[0]["self_images"] == 0
    assert res1.history[0]["context_versions"] == [1]
    assert res1.history[1]["self_images"] > 0 and res1.history[1]["self"] > 0
    for h1, h2 in zip(res1.history, res2.history):
        assert h1["bce"] == pytest.approx(h2["bce"], rel=0.10)
        assert h1["loss"] == pytest.approx(h2["loss"], rel=0.10)
    val = build_dataset(cfg1.data, "val", train=False)
    mious = []
    for res, cfg in ((res1, cfg1), (res2, cfg2)):
        model = build_model(cfg.model, cfg.data.num_classes)
        model.load_state_dict(torch.load(res.final_dir / "model.pt", weights_only=True))
        mious.append(evaluate_seeds(model, val, cfg, scales=(1.0,), flip=False, max_images=16)["best_miou"])
        assert checkpoint_context(load_checkpoint(res.final_dir)) is not None
    assert abs(mious[0] - mious[1]) <= 0.10, mious

    # The same config trained in one process (fit_local) gives the same checkpoint as the 1-worker
    # Ray run: both paths run engine.fit, so the context of epoch e is the same clustering.
    local = fit_local(cfg1, out_dir=tmp_path / "local")
    ray_ckpt, local_ckpt = load_checkpoint(res1.final_dir), load_checkpoint(tmp_path / "local" / "epoch_001")
    assert ray_ckpt["epoch"] == local_ckpt["epoch"] == 2
    assert set(ray_ckpt["bank"]["keys"]) == set(local_ckpt["bank"]["keys"])
    ctx_ray, ctx_local = checkpoint_context(ray_ckpt), checkpoint_context(local_ckpt)
    assert ctx_ray.version == ctx_local.version == local.context.version == 2
    assert torch.equal(ctx_ray.counts, ctx_local.counts)
    torch.testing.assert_close(ctx_ray.prototypes, ctx_local.prototypes, rtol=0, atol=2e-3)
    item = val[0]
    pacams = []
    for ckpt, ctx in ((ray_ckpt, ctx_ray), (local_ckpt, ctx_local)):
        model = build_model(cfg1.model, cfg1.data.num_classes)
        model.load_state_dict(ckpt["model"])
        pacams.append(multiscale_cams(model, item["image"], item["label"], scales=(1.0,), flip=False,
                                      context=ctx.prototypes, counts=ctx.counts, cpal_cfg=cfg1.cpal)["pacam"])
    assert pacams[0].size > 0 and np.abs(pacams[0] - pacams[1]).max() < 2e-3


def test_killed_bank_actor_is_restored_from_checkpoint(ray_start_2_cpus, tmp_path):
    from cpal_ray.distributed.trainer import run_training

    steps = 4
    cfg = cfg_for(tmp_path, "bankcrash", **{"faults.target": "bank", "faults.at_step": steps + 1, "dist.max_failures": 2})
    res = run_training(cfg)
    assert (res.run_dir / ".fault_bank_done").exists()
    bank = load_checkpoint(res.final_dir)["bank"]
    assert set(bank["keys"]) == expected_keys(2, steps, 2)
    assert res.history[-1]["epoch"] == 1


def test_sharded_bank_with_batched_pushes_survives_a_killed_shard(ray_start_2_cpus, tmp_path):
    """The scale features under the same fault: 2 class shards, pushes sent every 3 steps, shard 0
    killed mid-epoch 1. The run resumes from the checkpoint with every key once and the per-class
    entries equal to what the ranks pushed, exactly as with one bank actor. And only the newest
    ``train.keep_checkpoints`` checkpoints stay."""
    from cpal_ray.distributed.trainer import run_training

    steps = 4
    cfg = cfg_for(tmp_path, "shardcrash", **{"cpal.bank_shards": 2, "dist.bank_push_every": 3, "train.epochs": 3,
                                             "train.keep_checkpoints": 2, "faults.target": "bank",
                                             "faults.at_step": steps + 1, "dist.max_failures": 2})
    res = run_training(cfg)
    assert (res.run_dir / ".fault_bank_done").exists()
    bank = load_checkpoint(res.final_dir)["bank"]
    assert bank["shape"][0] == cfg.data.num_classes  # one logical bank in the checkpoint
    assert set(bank["keys"]) == expected_keys(3, steps, 2)
    # The history is the resumed attempt's (epochs 1-2): it started from the epoch-0 checkpoint's
    # bank (8 keys = 4 steps x 2 ranks) and added exactly what its ranks pushed.
    start = res.history[0]["bank_at_start"]
    assert res.history[0]["epoch"] == 1 and start["bank_keys"] == steps * 2
    pushed = sum(n for h in res.history for per_rank in h["pushed_per_rank"] for n in per_rank.values())
    assert int(bank["pushed"].sum()) == start["bank_entries"] + pushed and pushed > 0
    assert bank["size"].tolist() == [min(int(p), cfg.cpal.bank_size) for p in bank["pushed"]]
    last = res.history[-1]
    assert last["epoch"] == 2 and last["bank_shards"] == 2
    # Per epoch of 4 steps: a batch at step 3 and the rest flushed at the clustering, each one call
    # per shard: 2 x 2 calls for 4 steps (one actor unbatched: 1 per step; 2 shards unbatched: 2).
    assert last["bank_calls_per_step"] == 1.0
    assert len([p for p in (tmp_path / "shardcrash").glob("checkpoint_*") if p.is_dir()]) == 2


def test_stopped_run_restarts_at_next_epoch_with_bank_restored(ray_start_2_cpus, tmp_path):
    import ray.train

    from cpal_ray.distributed.trainer import run_training

    steps = 4
    stopping = cfg_for(tmp_path, "resume", **{"faults.kill_rank": 0, "faults.at_step": steps + 2, "dist.max_failures": 0})
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(stopping)
    ckpts = sorted(p for p in (tmp_path / "resume").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1
    saved = load_checkpoint(ckpts[0])
    assert saved["epoch"] == 1 and set(saved["bank"]["keys"]) == expected_keys(1, steps, 2)
    res = run_training(cfg_for(tmp_path, "resume"))
    assert [h["epoch"] for h in res.history][-1] == 1
    final = load_checkpoint(res.final_dir)
    assert set(final["bank"]["keys"]) == expected_keys(2, steps, 2)
    # The resumed run started from the saved bank: what it adds is exactly epoch 1's pushes.
    added = (final["bank"]["pushed"] - saved["bank"]["pushed"]).tolist()
    epoch1 = [0] * len(added)
    for per_rank in res.history[-1]["pushed_per_rank"]:
        for c, n in per_rank.items():
            epoch1[int(c)] += n
    assert added == epoch1 and sum(epoch1) > 0
    assert final["bank"]["version"] == saved["bank"]["version"] + 1


def test_worker_sigkilled_by_pid_resumes_at_its_epoch_with_its_bank(ray_start_2_cpus, tmp_path):
    """A node dying under a worker: rank 1 is SIGKILLed from outside, by PID, in epoch 2 once the
    controller has registered the checkpoints of epochs 0 and 1. The retry must start at epoch 2
    from exactly the bank of that checkpoint (not from epoch 0, not from an empty bank)."""
    import os
    import signal
    import threading
    import time

    from cpal_ray.distributed.trainer import SNAPSHOT_FILE, run_training

    steps = 4
    cfg = cfg_for(tmp_path, "sigkill", **{"train.epochs": 3, "faults.kill_rank": 1, "faults.at_step": 2 * steps + 1,
                                          "faults.wait_s": 240.0, "dist.max_failures": 1})
    run_dir, box = tmp_path / "sigkill", {}
    thread = threading.Thread(target=lambda: box.update(res=run_training(cfg)), daemon=True)
    thread.start()
    marker, snapshot, deadline = run_dir / ".fault_worker_done", run_dir / SNAPSHOT_FILE, time.monotonic() + 600

    def registered():
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    while not (marker.exists() and marker.read_text().startswith("pid") and registered() >= 2):
        assert thread.is_alive() and time.monotonic() < deadline, "the worker never reached the fault"
        time.sleep(0.2)
    pid = int(marker.read_text().split()[1])
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    res = box["res"]
    records = {r["epoch"]: r for r in json.loads((run_dir / "history.json").read_text())}
    assert sorted(records) == [0, 1, 2]
    resumed = records[2]
    assert resumed["start_epoch"] == 2  # resumed after the epoch-1 checkpoint, not from scratch
    saved_keys = expected_keys(2, steps, 2)
    saved_entries = sum(n for e in (0, 1) for per_rank in records[e]["pushed_per_rank"] for n in per_rank.values())
    assert resumed["bank_at_start"]["bank_keys"] == len(saved_keys)  # the bank of that checkpoint, whole
    assert resumed["bank_at_start"]["bank_entries"] == saved_entries > 0
    assert records[0]["bank_at_start"]["bank_keys"] == 0  # the first attempt started empty
    final = load_checkpoint(res.final_dir)
    assert set(final["bank"]["keys"]) == expected_keys(3, steps, 2)  # every key once, none lost


def test_an_error_retrying_cannot_fix_ends_the_run_at_once(ray_start_2_cpus, tmp_path):
    """A truncated JPEG with data.on_bad_sample=error raises in the worker: the run fails with that
    DataError, naming the file, on the first attempt, whatever dist.max_failures says."""
    import time

    from cpal_ray.data import DataError
    from cpal_ray.distributed.trainer import run_training
    from tests.fakes import make_voc_tree

    ids = ("2007_000032", "2007_000039", "2008_000123", "2007_000061")
    make_voc_tree(tmp_path / "voc", ids=ids)
    jpeg = tmp_path / "voc" / "JPEGImages" / f"{ids[1]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:60])
    cfg = cfg_for(tmp_path, "badjpeg", **{"data.dataset": "voc", "data.root": str(tmp_path / "voc"),
                                          "data.train_split": "train", "data.resize_long": [24, 40],
                                          "data.crop_size": 32, "train.batch_size": 2, "dist.num_workers": 1,
                                          "cpal.enabled": False, "dist.max_failures": 3})
    t0 = time.monotonic()
    with pytest.raises(DataError, match=ids[1]):
        run_training(cfg)
    assert time.monotonic() - t0 < 120
