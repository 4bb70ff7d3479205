"""The refine half without Ray: the two networks, the stage configs, the label-folder datasets, the
one loop training each network, the random-walk mask and the segmenter's prediction per image,
and the per-image jobs' resume (byte-identical)."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from cpal_ray.config import ConfigError, load_config
from cpal_ray.data import DataError, ImageFolderDataset, LabelFolderDataset, build_dataset, build_train_dataset
from cpal_ray.engine import fit
from cpal_ray.inference.evaluate import evaluate_labels
from cpal_ray.inference.io import save_label_png
from cpal_ray.models import EdgeNet, SegNet, build_backbone, build_task_model

pytestmark = pytest.mark.unit


def tiny_cfg(*overrides):
    return load_config("configs/synthetic_tiny.yaml", ["data.synthetic_images=24", "dist.num_workers=1",
                                                       *overrides])


def gt_folder(cfg, folder, split="train", degrade=None):
    """The ground-truth masks of a synthetic split written as label PNGs (a perfect 'pseudo-label')."""
    ds = build_dataset(cfg.data, split, train=False)
    folder.mkdir(parents=True, exist_ok=True)
    for i, sid in enumerate(ds.ids):
        mask = np.asarray(ds.read(i)[1], np.uint8)
        save_label_png(folder / f"{sid}.png", degrade(mask) if degrade else mask)
    return folder


def test_edge_net_trains_only_its_branch_at_stride_4():
    net = EdgeNet(build_backbone("tiny", width=16))
    out = net(torch.randn(2, 3, 50, 70))["boundary_logits"]
    assert out.shape == (2, 13, 18)  # ceil(50 / 4), ceil(70 / 4)
    out.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    assert all(p.grad is not None for g in net.param_groups() for p in g["params"])
    net.train()
    assert not net.backbone.training  # frozen backbone stays in eval mode (its BatchNorm statistics too)


@pytest.mark.parametrize("head", ["deeplabv3", "lraspp"])
def test_seg_net_predicts_every_class_at_the_input_size(head):
    net = SegNet(build_backbone("tiny", width=16), classes=5, head=head)
    assert net(torch.randn(2, 3, 50, 70))["logits"].shape == (2, 5, 50, 70)
    groups = {g["name"]: g for g in net.param_groups(10.0)}
    assert groups["new_layers"]["lr_mult"] == 10.0 and groups["backbone"]["params"]
    bn = [m for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(not p.requires_grad for m in bn for p in m.parameters())


def test_each_refine_run_reads_its_own_section():
    cfg = tiny_cfg("affinity.epochs=4", "affinity.batch_size=6", "seg.lr=0.02", "affinity.crop_size=64")
    a = cfg.for_task("affinity")
    t = a.training
    assert (a.train.task, a.train.name, t.epochs, t.batch_size, t.crop_size) == \
        ("affinity", "synthetic-tiny-affinity", 4, 6, 64)
    assert not t.uses_bank and t.diag_images == 0 and t.new_layer_lr_mult == 1.0 and t.lr == cfg.affinity.lr
    s = cfg.for_task("seg")
    assert (s.train.name, s.training.lr, s.training.new_layer_lr_mult) == ("synthetic-tiny-seg", 0.02, 10.0)
    # not the CAM run's multiplier (the photo config's 100 would put the head at lr 1.0)
    assert load_config("configs/voc_mini_cpu.yaml").for_task("seg").training.new_layer_lr_mult == 10.0
    assert a.for_task("affinity").train.name == "synthetic-tiny-affinity"  # idempotent
    assert cfg.for_task("cam") is cfg
    with pytest.raises(ConfigError, match="train.task"):
        cfg.for_task("depth")
    with pytest.raises(ConfigError, match="affinity.walk_mode"):
        tiny_cfg("affinity.walk_mode=sum")


def test_an_override_the_stage_does_not_read_is_an_error_naming_the_one_it_reads():
    with pytest.raises(ConfigError, match="train.epochs: the affinity stage trains affinity.epochs; set that"):
        load_config("configs/synthetic_tiny.yaml", ["train.task=affinity", "train.epochs=1"])
    with pytest.raises(ConfigError, match="optim.lr: the seg stage trains seg.lr"):
        load_config("configs/synthetic_tiny.yaml", ["train.task=seg", "optim.lr=0.5"])
    with pytest.raises(ConfigError, match="optim.new_layer_lr_mult: the seg stage does not read it"):
        load_config("configs/synthetic_tiny.yaml", ["train.task=seg", "optim.new_layer_lr_mult=1"])
    assert load_config("configs/synthetic_tiny.yaml", ["train.epochs=1"]).training.epochs == 1  # the CAM run's
    with pytest.raises(ConfigError, match="affinity.batch_size"):  # the stage's batch over the workers
        load_config("configs/synthetic_tiny.yaml", ["train.task=affinity", "affinity.batch_size=3",
                                                    "dist.num_workers=2"])


def test_label_folder_dataset_reads_the_pngs_and_names_what_is_missing(tmp_path):
    cfg = tiny_cfg()
    folder = gt_folder(cfg, tmp_path / "seeds")
    base = build_dataset(cfg.data, "train", train=False)
    ds = LabelFolderDataset(base, folder)
    assert ds.ids == base.ids
    np.testing.assert_array_equal(ds.read(3)[1], base.read(3)[1])
    (folder / f"{base.ids[0]}.png").unlink()
    with pytest.raises(DataError, match=f"{folder}: no label PNG for 1 of 24 ids"):
        LabelFolderDataset(base, folder)
    skipped = LabelFolderDataset(base, folder, on_bad_sample="skip")
    assert base.ids[0] not in skipped.ids and skipped.skipped[0][0] == base.ids[0]
    save_label_png(folder / f"{base.ids[1]}.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="label size"):
        skipped.read(0)
    with pytest.raises(DataError, match="seg.masks_dir: not set"):
        build_train_dataset(cfg.for_task("seg"))


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataset(tmp_path, 20, [str(i) for i in range(20)])
    Image.new("RGB", (30, 20)).save(tmp_path / "b.jpg")
    Image.new("RGB", (10, 12)).save(tmp_path / "a.PNG")
    (tmp_path / "notes.txt").write_text("x")
    ds = ImageFolderDataset(tmp_path, 20, [str(i) for i in range(20)])
    assert ds.ids == ["a", "b"] and ds[1]["image"].shape == (3, 20, 30)
    Image.new("RGB", (30, 20)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="share the id 'b'"):
        ImageFolderDataset(tmp_path, 20, [str(i) for i in range(20)])


def test_the_one_loop_trains_the_affinity_network(tmp_path):
    """IRN's loss on perfect seeds falls, and the learnt boundary is higher on the objects' edges
    than inside them: what the random walk needs."""
    cfg = tiny_cfg("affinity.epochs=6", "affinity.batch_size=8", "affinity.lr=0.5",
                   "affinity.crop_size=96", "affinity.resize_long=[96,96]",
                   f"affinity.seeds_dir={gt_folder(tiny_cfg(), tmp_path / 'seeds')}").for_task("affinity")
    res = fit(cfg)
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < 0.8 * losses[0], losses
    ds = build_dataset(cfg.data, "train", train=False)
    from cpal_ray.refine.masks import boundary_map

    edge_minus_inside = []
    for i in range(8):
        item = ds[i]
        b = boundary_map(res.model, item["image"], flip=False)
        m = item["mask"][2::4, 2::4][: b.shape[0], : b.shape[1]]
        fg = (m > 0).float()
        grow = torch.nn.functional.max_pool2d(fg[None, None], 3, 1, 1)[0, 0]
        shrink = -torch.nn.functional.max_pool2d(-fg[None, None], 3, 1, 1)[0, 0]
        edge, inside = (grow - shrink) > 0, shrink > 0
        if edge.any() and inside.any():
            edge_minus_inside.append(float(b[edge].mean() - b[inside].mean()))
    assert edge_minus_inside and np.mean(edge_minus_inside) > 0.05, edge_minus_inside


def test_segmentation_training_raises_val_miou_above_an_untrained_model(tmp_path):
    from cpal_ray.inference.image_jobs import seg_job

    cfg = tiny_cfg("seg.epochs=8", "seg.batch_size=8", "seg.lr=0.05", "seg.crop_size=96",
                   "seg.resize_long=[96,96]", f"seg.masks_dir={gt_folder(tiny_cfg(), tmp_path / 'm')}").for_task("seg")
    val = build_dataset(cfg.data, "val", train=False)

    def score(model, name):
        for i in range(len(val)):
            assert seg_job(model, val, i, tmp_path / name, cfg.seg, cfg.pseudo)["status"] == "done"
        return evaluate_labels(tmp_path / name, val)["miou"]

    torch.manual_seed(cfg.train.seed)
    untrained = score(build_task_model(cfg), "untrained")
    trained = score(fit(cfg).model, "trained")
    assert trained > untrained + 0.15, (untrained, trained)


def test_walk_label_fills_the_region_behind_no_wall_and_stops_at_a_wall():
    """A CAM peak on the left of a 32 x 32 image; a boundary wall down the middle of its stride-4
    map: the walk spreads the class over the whole left half and not across the wall."""
    cfg = load_config(None).affinity
    cams = np.zeros((1, 32, 32), np.float32)
    cams[0, 12:20, 4:8] = 1.0
    boundary = torch.zeros(8, 8)
    boundary[:, 4] = 1.0
    label = __import__("cpal_ray.refine.masks", fromlist=["walk_label"]).walk_label(cams, [6], boundary, cfg)
    assert label.shape == (32, 32) and set(np.unique(label)) == {0, 7}
    assert (label[:, :12] == 7).mean() > 0.95  # the whole left side, far beyond the peak
    assert (label[:, 20:] == 0).all()  # nothing across the wall
    no_wall = __import__("cpal_ray.refine.masks", fromlist=["walk_label"]).walk_label(cams, [6], torch.zeros(8, 8), cfg)
    assert (no_wall[:, 20:] == 7).mean() > 0.5  # without the wall it does cross


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mask_and_seg_jobs_resume_to_the_same_bytes(tmp_path):
    from cpal_ray.inference.io import cam_path
    from cpal_ray.inference.io import save_cams_npz
    from cpal_ray.inference.image_jobs import mask_job, seg_job

    cfg = tiny_cfg()
    ds = build_dataset(cfg.data, "train", train=False)
    torch.manual_seed(0)
    edge = EdgeNet(build_backbone("tiny", width=16)).eval()
    seg = SegNet(build_backbone("tiny", width=16), cfg.data.num_classes + 1).eval()
    for i in range(3):
        classes = np.flatnonzero(ds.label_of(i))
        h, w = ds.read(i)[0].shape[:2]
        save_cams_npz(cam_path(tmp_path / "cams", ds.ids[i]), classes, np.random.default_rng(i).random((len(classes), h, w)))
    first = [mask_job(edge, ds, i, tmp_path / "cams", tmp_path / "masks", cfg.affinity) for i in range(3)]
    seg_first = [seg_job(seg, ds, i, tmp_path / "seg", cfg.seg, cfg.pseudo) for i in range(3)]
    assert [r["status"] for r in first + seg_first] == ["done"] * 6
    for i, (mask_row, seg_row) in enumerate(zip(first, seg_first)):
        # A mask row lists the image's labels; a prediction row the foreground classes it predicted.
        assert mask_row["classes"] == np.flatnonzero(ds.label_of(i)).tolist()
        predicted = np.unique(np.asarray(Image.open(tmp_path / "seg" / f"{ds.ids[i]}.png")))
        assert seg_row["classes"] == [int(c) - 1 for c in predicted if 0 < c < 255]
        assert mask_row["frac_ignored"] == seg_row["frac_ignored"] == 0.0  # neither leaves pixels unlabelled
    p0, p1 = tmp_path / "masks" / f"{ds.ids[0]}.png", tmp_path / "masks" / f"{ds.ids[1]}.png"
    p1.write_bytes(p1.read_bytes()[:40])  # truncated by a kill
    (tmp_path / "seg" / f"{ds.ids[2]}.png").unlink()
    again = [mask_job(edge, ds, i, tmp_path / "cams", tmp_path / "masks", cfg.affinity) for i in range(3)]
    seg_again = [seg_job(seg, ds, i, tmp_path / "seg", cfg.seg, cfg.pseudo) for i in range(3)]
    assert [r["status"] for r in again] == ["skipped", "done", "skipped"]
    assert [r["status"] for r in seg_again] == ["skipped", "skipped", "done"]
    assert [r["sha256"] for r in again] == [r["sha256"] for r in first] and _sha(p0) == first[0]["sha256"]
    assert [r["sha256"] for r in seg_again] == [r["sha256"] for r in seg_first]
    (tmp_path / "cams" / f"{ds.ids[1]}.npz").unlink()
    p1.unlink()
    bad = mask_job(edge, ds, 1, tmp_path / "cams", tmp_path / "masks", cfg.affinity)
    assert bad["status"] == "failed" and bad["error"].startswith(f"id {ds.ids[1]}: ")


@pytest.mark.parametrize("mode", ["average", "mass"])
@pytest.mark.parametrize("size", [(7, 9), (3, 12), (20, 6)])
def test_pair_walk_equals_the_walk_on_the_matrix(mode, size):
    from cpal_ray.refine.affinity import (affinity_matrix, boundary_affinity, pair_indices, pair_walk, random_walk,
                                          transition_matrix)

    g = torch.Generator().manual_seed(sum(size))
    boundary = torch.rand(size, generator=g, dtype=torch.float64) * 0.6
    maps = torch.rand((2, *size), generator=g, dtype=torch.float64)
    aff = boundary_affinity(boundary, 5)
    src, dst = pair_indices(*size, 5)
    ref = random_walk(maps, transition_matrix(affinity_matrix(aff, src, dst, size[0] * size[1], 10.0), mode), 6)
    torch.testing.assert_close(pair_walk(maps, aff, 5, 10.0, 6, mode), ref, rtol=1e-10, atol=1e-12)
    if mode == "mass":
        torch.testing.assert_close(ref.sum(dim=(1, 2)), maps.sum(dim=(1, 2)))
