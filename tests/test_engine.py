"""Single-process training (no Ray): the sampler, the schedule, fit() and its hooks, learning."""
import pytest
import torch

from cpal_ray.config import load_config
from cpal_ray.engine import (Hook, build_optimizer, build_scheduler, checkpoint_context, fit, fit_local,
                             load_checkpoint, task_hooks)
from cpal_ray.engine.sampler import GlobalBatchSampler
from cpal_ray.inference.evaluate import evaluate_seeds
from cpal_ray.models import build_model

pytestmark = pytest.mark.unit


def tiny_cfg(**over):
    base = {"train.epochs": 2, "train.log_every": 100, "dist.num_workers": 1}
    base.update(over)
    return load_config("configs/synthetic_tiny.yaml", base)


def test_global_batches_are_the_union_of_rank_batches():
    single = list(GlobalBatchSampler(20, 8, 1, 0, seed=3))
    ranks = [list(GlobalBatchSampler(20, 8, 2, r, seed=3)) for r in range(2)]
    assert len(single) == 2 == len(ranks[0])
    for step in range(2):
        assert ranks[0][step] + ranks[1][step] == single[step]
        assert len(ranks[0][step]) == 4
    s = GlobalBatchSampler(20, 8, 1, 0, seed=3)
    s.set_epoch(1)
    assert list(s) != single  # a new permutation each epoch
    # Smaller than a batch: the order wraps around to fill one global batch (rank 1 takes 4..7).
    assert list(GlobalBatchSampler(5, 8, 2, 1, shuffle=False)) == [[4, 0, 1, 2]]
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(20, 7, 2, 0)
    # Steps per epoch: full global batches only, capped by max_steps, at least one.
    assert [len(GlobalBatchSampler(n, 8, max_steps=m)) for n, m in ((32, 0), (33, 0), (32, 3), (3, 0))] == [4, 4, 3, 1]


def test_param_groups_get_x10_lr_and_poly_decays_to_zero():
    cfg = tiny_cfg()
    model = build_model(cfg.model, cfg.data.num_classes)
    opt = build_optimizer(model, cfg.optim)
    lr, mult = cfg.optim.lr, cfg.optim.new_layer_lr_mult
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, lr * mult])
    assert opt.defaults["momentum"] == cfg.optim.momentum and opt.defaults["weight_decay"] == cfg.optim.weight_decay
    sched = build_scheduler(opt, 10, 0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr * 0.5 ** 0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(lr * mult * 0.5 ** 0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_training_two_epochs_learns_on_synthetic(tmp_path):
    """BCE falls and seed mIoU clearly beats the untrained network (same init), for the BCE
    baseline; CPAL (centred PACAM) learns too. Measured at 2 epochs on this set: untrained 0.21,
    BCE 0.33, CPAL 0.26 (uncentred 0.32): L_self pulls the young CAM toward a still poorer PACAM."""
    from cpal_ray.data import build_dataset

    cfg = tiny_cfg(**{"train.epochs": 2})
    val = build_dataset(cfg.data, "val", train=False)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model, cfg.data.num_classes)
    before = evaluate_seeds(untrained, val, cfg, scales=(1.0,), flip=False)["best_miou"]
    base = fit_local(cfg.replace(**{"cpal.enabled": False}))
    assert base.history[-1]["bce"] < base.history[0]["bce"] - 0.03
    assert evaluate_seeds(base.model, val, cfg, scales=(1.0,), flip=False)["best_miou"] > before + 0.08
    out = fit_local(cfg, out_dir=tmp_path)
    hist = out.history
    after = evaluate_seeds(out.model, val, cfg, scales=(1.0,), flip=False)["best_miou"]
    assert after > before + 0.03, (before, after)
    # CPAL was active: warm-up clustering gave context prototypes and L_self ran.
    assert hist[0]["context_version"] >= 1 and sum(h["self_images"] for h in hist) > 0
    assert out.bank.counts().sum() > 0 and out.context is not None
    # A checkpoint per epoch, with the bank state, holding the context the next epoch uses.
    state = load_checkpoint(tmp_path / "epoch_001")
    assert state["epoch"] == 2 and state["bank"]["keys"]
    assert checkpoint_context(state).version == out.context.version == hist[-1]["context_versions"][0]
    pacam = evaluate_seeds(out.model, val, cfg, context=out.context, cam_source="pacam", scales=(1.0,), flip=False)
    cam_only = evaluate_seeds(out.model, val, cfg, cam_source="cam", scales=(1.0,), flip=False)
    assert pacam["cam_source"] == "pacam" and pacam["miou"] != cam_only["miou"]


def test_baseline_trains_without_bank():
    cfg = tiny_cfg(**{"cpal.enabled": False, "train.epochs": 1, "train.max_steps_per_epoch": 2})
    out = fit_local(cfg)
    assert out.bank is None and out.context is None
    assert out.history[0]["self"] == 0.0 and out.history[0]["steps"] == 2
    assert "context_versions" not in out.history[0]  # no clustering without a bank


def test_non_finite_loss_names_the_first_bad_step():
    cfg = tiny_cfg(**{"train.epochs": 1, "train.max_steps_per_epoch": 3, "train.log_every": 100})
    model = build_model(cfg.model, cfg.data.num_classes)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"epoch 0 step 0 \(rank 0\).*'bce': nan"):
        fit_local(cfg, model=model)


def test_local_run_resumes_after_its_last_checkpoint(tmp_path):
    """Stopped after epoch 0 and started again, the run continues at epoch 1 from the saved bank."""
    class StopAtEpoch1(Hook):
        def before_epoch(self, state):
            if state.epoch == 1:
                raise KeyboardInterrupt

    cfg = tiny_cfg(**{"train.epochs": 2, "train.max_steps_per_epoch": 2})
    full = fit_local(cfg, out_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        fit_local(cfg, out_dir=tmp_path / "split", hooks=[StopAtEpoch1()])
    assert not (tmp_path / "split" / "epoch_001").exists()
    saved = load_checkpoint(tmp_path / "split" / "epoch_000")
    resumed = fit_local(cfg, out_dir=tmp_path / "split")
    assert [h["epoch"] for h in resumed.history] == [1]  # epoch 0 was not trained again
    keys_after = set(load_checkpoint(tmp_path / "split" / "epoch_001")["bank"]["keys"])
    assert set(saved["bank"]["keys"]) < keys_after  # started from the saved bank, added epoch 1
    assert keys_after == set(load_checkpoint(tmp_path / "full" / "epoch_001")["bank"]["keys"])
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_hooks_run_in_order_and_see_the_new_context():
    calls = []

    class Spy(Hook):
        def before_epoch(self, state):
            calls.append(("before", state.epoch))

        def after_step(self, state, step, outputs):
            calls.append(("step", state.epoch, step))

        def after_epoch(self, state, record):
            # CPAL's hook ran first: the record carries the clustering for the next epoch.
            calls.append(("after", state.epoch, record["context_versions"][0], state.extras["context"].version))

    cfg = tiny_cfg(**{"train.epochs": 2, "train.max_steps_per_epoch": 2, "cpal.warmup_cluster_steps": 0})
    saved = []
    out = fit_local(cfg, hooks=[Spy()])
    assert calls == [("before", 0), ("step", 0, 0), ("step", 0, 1), ("after", 0, 1, 1),
                     ("before", 1), ("step", 1, 0), ("step", 1, 1), ("after", 1, 2, 2)]
    assert out.history[0]["self_images"] == 0 and out.history[1]["self_images"] > 0  # cold start, then L_self
    from cpal_ray.cpal import PrototypeBank
    from cpal_ray.models import embed_dim

    fit(cfg, hooks=task_hooks(cfg, lambda: PrototypeBank.from_config(cfg, embed_dim(cfg.model))),
        save_fn=lambda ck, rec: saved.append(ck))
    assert [c["epoch"] for c in saved] == [1, 2] and all(c["bank"]["context"]["version"] == c["epoch"] for c in saved)


def test_every_epoch_records_what_cpal_did():
    """The history says whether CPAL was active and what it did to the maps (issue: diagnostics)."""
    cfg = tiny_cfg(**{"train.epochs": 2, "train.max_steps_per_epoch": 3, "train.diag_images": 6,
                      "cpal.warmup_cluster_steps": 0, "cpal.top_k": 4})
    hist = fit_local(cfg).history
    first, second = hist
    assert first["self_image_share"] == 0.0 and first["self_class_share"] == 0.0  # cold start: BCE only
    assert 0.0 < second["self_class_share"] <= 1.0
    assert 0.0 < second["self_image_share"] <= 1.0 and second["self_images"] > 0
    assert first["classes_below_k"] == [c for c, n in enumerate(first["bank_fill"]) if n < cfg.cpal.top_k]
    for record in hist:  # context of the next epoch exists after each epoch: both maps are scored
        for key in ("diag_cam_miou", "diag_pacam_miou", "diag_cam_ratio", "diag_pacam_ratio", "diag_agreement_l1",
                    "diag_agreement_iou", "diag_embedding_cosine", "diag_pacam_above"):
            assert isinstance(record[key], float) and record[key] == record[key], key  # a number, not NaN
        assert 0.0 <= record["diag_cam_miou"] <= 1.0 and 0.0 <= record["diag_agreement_iou"] <= 1.0
    baseline = fit_local(cfg.replace(**{"cpal.enabled": False})).history[-1]
    assert "diag_cam_miou" in baseline and "diag_pacam_miou" not in baseline and "classes_below_k" not in baseline


def test_run_records_appear_while_it_trains(tmp_path):
    """TensorBoard events, history.json and curves.png are in the run folder after the first
    epoch, before the run ends; a resumed run keeps the earlier epochs' records."""
    import json

    seen = {}

    class LookAfterEpoch0(Hook):
        def before_epoch(self, state):
            if state.epoch == 1:  # epoch 0 is over, the run is not
                seen["events"] = sorted(p.name for p in (tmp_path / "tensorboard").glob("events.out.tfevents.*"))
                seen["history"] = json.loads((tmp_path / "history.json").read_text())
                seen["curves"] = (tmp_path / "curves.png").stat().st_size

    cfg = tiny_cfg(**{"train.epochs": 2, "train.max_steps_per_epoch": 2, "train.log_every": 1})
    fit_local(cfg, out_dir=tmp_path, hooks=[LookAfterEpoch0()])
    assert seen["events"] and [r["epoch"] for r in seen["history"]] == [0] and seen["curves"] > 0
    assert [r["epoch"] for r in json.loads((tmp_path / "history.json").read_text())] == [0, 1]
    scalars = read_scalars(tmp_path / "tensorboard")
    assert {"step/loss", "step/lr", "epoch/bce", "epoch/self"} <= set(scalars)
    assert [step for step, _ in scalars["step/loss"]] == [0, 1, 2, 3]  # every step (log_every 1), global index


def read_scalars(folder) -> dict[str, list]:
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_mlflow_hook_logs_each_epochs_numbers():
    from cpal_ray.engine.tracking import MlflowHook

    calls = []
    client = type("FakeMlflow", (), {"log_metrics": lambda self, m, step: calls.append((step, m))})()
    MlflowHook(client).after_epoch(None, {"epoch": 3, "loss": 0.5, "bank_fill": [1, 2], "cluster_device": "cpu",
                                          "self": float("nan")})
    assert calls == [(3, {"loss": 0.5})]
