"""The whole pipeline on Ray (synthetic set, one epoch per network): every stage writes what the
next reads and is scored; started again it skips what is complete and redoes, byte for byte, what
a kill left missing or broken; the segmenter predicts a folder of photos; bad inputs say so."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cpal_ray.config import load_config
from cpal_ray.data import build_dataset
from tests.test_cli import run_cli

pytestmark = pytest.mark.ray


def _cfg():
    return load_config("configs/synthetic_tiny.yaml", [
        "data.synthetic_images=12", "train.epochs=1", "cpal.enabled=false", "dist.num_workers=1",
        "dist.cpus_per_worker=0.5", "inference.actor_cpus=0.5", "inference.scales=[1.0]", "pseudo.actor_cpus=0.5",
        "affinity.epochs=1", "affinity.batch_size=4", "affinity.crop_size=64", "affinity.actor_cpus=0.5",
        "affinity.exp_times=4", "seg.epochs=1", "seg.batch_size=4", "seg.crop_size=64", "seg.actor_cpus=0.5"])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pipeline(ray_start_2_cpus, tmp_path_factory):
    from cpal_ray.pipeline.wsss import run_pipeline

    out = tmp_path_factory.mktemp("wsss")
    return out, run_pipeline(_cfg(), out)


def test_every_stage_writes_what_the_next_reads_and_is_scored(pipeline):
    out, res = pipeline
    summary = json.loads((out / "pipeline.json").read_text())
    assert set(summary["scores"]) == {"seeds", "crf", "masks", "seg_val"}
    assert all(0.0 <= s["miou"] <= 1.0 for s in summary["scores"].values())
    assert summary["scores"]["crf"]["frac_ignored"] > 0 and summary["scores"]["masks"]["frac_ignored"] == 0
    assert set(summary["seconds"]) == {"train_cam", "crf_seeds", "train_affinity", "masks", "train_seg", "eval_seg"}
    train_ids = build_dataset(_cfg().data, "train", train=False).ids
    val_ids = build_dataset(_cfg().data, "val", train=False).ids
    assert sorted(p.stem for p in (out / "masks-train").glob("*.png")) == sorted(train_ids)
    assert sorted(p.stem for p in (out / "seg-val").glob("*.png")) == sorted(val_ids)
    for folder in ("masks-train", "seg-val"):
        rows = pq.read_table(out / folder / "manifest.parquet").to_pylist()
        assert {r["status"] for r in rows} == {"done"} and all(r["sha256"] for r in rows)
    for task, final in res["final"].items():
        cfg_text = Path(str(final), "config.yaml").read_text()
        assert f"task: {task}" in cfg_text, task
    assert (out / "seg-val" / "seg_miou.json").is_file()


def test_a_restart_skips_what_is_complete_and_redoes_what_a_kill_broke(pipeline):
    from cpal_ray.pipeline.wsss import run_pipeline

    out, first = pipeline
    masks = sorted((out / "masks-train").glob("*.png"))
    before = {p.name: _sha(p) for p in masks}
    masks[0].unlink()
    masks[1].write_bytes(masks[1].read_bytes()[:30])  # a half-written file (never left by the atomic writes)
    seg_final = Path(str(first["final"]["seg"]))
    weights = _sha(seg_final / "model.pt")
    shutil.rmtree(seg_final)  # the segmenter's export lost: its run resumes from its last checkpoint
    again = run_pipeline(_cfg(), out)
    assert again["timings"]["train_cam"] < 1.0 and again["timings"]["train_affinity"] < 1.0
    assert {p.name: _sha(p) for p in (out / "masks-train").glob("*.png")} == before
    rows = {r["id"]: r["status"] for r in pq.read_table(out / "masks-train" / "manifest.parquet").to_pylist()}
    assert sorted(k for k, v in rows.items() if v == "done") == sorted([masks[0].stem, masks[1].stem])
    assert _sha(Path(str(again["final"]["seg"])) / "model.pt") == weights
    assert again["scores"]["masks"]["miou"] == first["scores"]["masks"]["miou"]
    assert again["scores"]["seg_val"]["miou"] == first["scores"]["seg_val"]["miou"]


def test_the_segmenter_predicts_a_folder_of_photos(pipeline, tmp_path):
    from PIL import Image

    from cpal_ray.distributed.stages import run_seg_predict

    out, res = pipeline
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.jpg", (40, 30)), ("b.png", (64, 48))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / name)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    summary = run_seg_predict(_cfg(), res["final"]["seg"], tmp_path / "pred", images_dir=photos)
    assert summary.counts == {"done": 2, "skipped": 0, "failed": 1} and summary.failures[0][0] == "broken"
    with Image.open(tmp_path / "pred" / "b.png") as im:
        assert im.mode == "P" and im.size == (64, 48) and np.asarray(im).max() <= _cfg().data.num_classes


def test_a_refine_stage_refuses_the_wrong_checkpoint_and_a_missing_label_folder(pipeline, tmp_path):
    from cpal_ray.distributed.stages import run_make_masks
    from cpal_ray.engine.checkpoint import CheckpointError

    out, res = pipeline
    with pytest.raises(CheckpointError, match="'cam' checkpoint"):
        run_make_masks(_cfg(), res["final"]["cam"], tmp_path / "m", cam_dir=out / "pseudo-train" / "cams")
    assert not (tmp_path / "m").exists()
    proc = run_cli("workflows.train_seg", "--config", "configs/synthetic_tiny.yaml", "--masks", str(tmp_path / "none"),
                   f"train.storage_path={tmp_path / 'runs'}")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'none'}: no such label folder"
    assert not (tmp_path / "runs").exists()
