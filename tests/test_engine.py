"""Single-process training (no Ray): the sampler, the schedule, and learning on the synthetic set."""
import pytest
import torch

from cpal_ray.config import load_config
from cpal_ray.engine import (build_optimizer, evaluate_seeds, fit_local, load_checkpoint, poly_scheduler,
                             steps_per_epoch)
from cpal_ray.engine.sampler import GlobalBatchSampler
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
    assert list(GlobalBatchSampler(5, 8, 2, 1))[0] != []  # smaller than a batch: wraps around
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(20, 7, 2, 0)


def test_param_groups_get_x10_lr_and_poly_decays_to_zero():
    cfg = tiny_cfg()
    model = build_model(cfg.model, cfg.data.num_classes)
    opt = build_optimizer(model, cfg.optim)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.optim.lr, cfg.optim.lr * 10])
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    sched = poly_scheduler(opt, 10, 0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * 0.5 ** 0.9)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    assert steps_per_epoch(32, 8) == 4 and steps_per_epoch(32, 8, max_steps=3) == 3 and steps_per_epoch(3, 8) == 1


def test_training_two_epochs_learns_on_synthetic(tmp_path):
    """BCE falls and seed mIoU clearly beats the untrained network (same init)."""
    from cpal_ray.data import build_dataset

    cfg = tiny_cfg(**{"train.epochs": 2})
    val = build_dataset(cfg.data, "val", train=False)
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg.model, cfg.data.num_classes)
    before = evaluate_seeds(untrained, val, cfg, scales=(1.0,), flip=False)
    out = fit_local(cfg, out_dir=tmp_path)
    hist = out["history"]
    assert hist[-1]["bce"] < hist[0]["bce"] - 0.03
    after = evaluate_seeds(out["model"], val, cfg, scales=(1.0,), flip=False)
    assert after["best_miou"] > before["best_miou"] + 0.08, (before["best_miou"], after["best_miou"])
    # CPAL was active: warm-up clustering gave context prototypes and L_self ran.
    assert hist[0]["context_version"] >= 1 and sum(h["self_images"] for h in hist) > 0
    assert out["bank"].counts().sum() > 0 and out["context"] is not None
    # A checkpoint per epoch, with the bank state and loadable weights-only.
    state = load_checkpoint(tmp_path / "epoch_001")
    assert state["epoch"] == 2 and state["bank"]["keys"]
    pacam = evaluate_seeds(out["model"], val, cfg, context=out["context"], cam_source="pacam", scales=(1.0,), flip=False)
    assert 0.0 < pacam["best_miou"] <= 1.0


def test_baseline_trains_without_bank():
    cfg = tiny_cfg(**{"cpal.enabled": False, "train.epochs": 1, "train.max_steps_per_epoch": 2})
    out = fit_local(cfg)
    assert out["bank"] is None and out["context"] is None
    assert out["history"][0]["self"] == 0.0 and out["history"][0]["steps"] == 2


def test_non_finite_loss_names_the_step():
    cfg = tiny_cfg(**{"train.epochs": 1, "train.max_steps_per_epoch": 1, "optim.lr": 1e30, "optim.grad_clip": 0.0})
    with pytest.raises(FloatingPointError, match="epoch 0 step"):
        model = build_model(cfg.model, cfg.data.num_classes)
        with torch.no_grad():
            model.classifier.weight.fill_(float("nan"))
        fit_local(cfg, model=model)
