"""Safe by default (issue 16): no code from data files, no silent wrong labels or scores,
checkpoints that fail safe, bad inputs refused before Ray starts and before anything is written.

Each test here fails on the code before the fix: a crafted label file ran code, a truncated
checkpoint stopped every resume, a missing mask was scored, a missing dataset started Ray.
The Ray-side checks (non-retryable errors end a run at once, a worker SIGKILLed by PID resumes
at the right epoch with its bank) are in tests/test_distributed_train.py.
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cpal_ray.config import load_config
from cpal_ray.data import DataError, build_dataset, convert_labels, labels_source
from cpal_ray.data.labels import read_label_file
from cpal_ray.engine import CheckpointError, fit_local, load_checkpoint
from cpal_ray.engine.checkpoint import SUMS_FILE, read_checksums
from tests.fakes import make_voc_tree, write_mask

pytestmark = pytest.mark.unit
VOC_SMALL = {"data.dataset": "voc", "data.resize_long": [24, 40], "data.crop_size": 32}


def tiny_cfg(**over):
    base = {"train.epochs": 2, "train.log_every": 100, "dist.num_workers": 1, "train.max_steps_per_epoch": 2,
            "train.diag_images": 0}
    base.update(over)
    return load_config("configs/synthetic_tiny.yaml", base)


def voc_cfg(root, **over):
    return tiny_cfg(**{**VOC_SMALL, "data.root": str(root), "data.train_split": "train", "train.batch_size": 2,
                       **over})


class _RunsCode:
    """Pickles to a call of os.system: what a crafted cls_labels.npy would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------ label files

def test_a_crafted_label_file_is_refused_without_running_its_code(tmp_path):
    fake = make_voc_tree(tmp_path / "voc")
    marker = tmp_path / "code-ran"
    labels = {sid: v for sid, v in fake.labels.items()}
    labels[fake.ids[0]] = _RunsCode(marker)
    np.save(tmp_path / "voc" / "cls_labels.npy", np.array(labels, dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"cls_labels\.npy.*system") as err:
        build_dataset(load_config(None, {**VOC_SMALL, "data.root": str(tmp_path / "voc"),
                                         "data.train_split": "train"}).data, "train")
    assert not marker.exists(), "loading the label file ran its code"
    assert "not a label file cpal-ray can read safely" in str(err.value)


def test_wsss_npy_labels_read_and_convert_to_json(tmp_path, capsys):
    from workflows import convert_labels as convert_workflow
    from workflows.common import run

    fake = make_voc_tree(tmp_path / "voc", key_style="int")  # IRN-style: {2007000032: float32[20]}
    npy = tmp_path / "voc" / "cls_labels.npy"
    raw = read_label_file(npy)
    assert sorted(raw) == [2007000032, 2007000039, 2008000123]
    cfg = load_config(None, {**VOC_SMALL, "data.root": str(tmp_path / "voc"), "data.train_split": "train"})
    from_npy = build_dataset(cfg.data, "train")
    dst, n = convert_labels(npy)
    assert dst == npy.with_suffix(".json") and n == 3
    assert json.loads(dst.read_text())["2007000032"] == fake.labels["2007_000032"].astype(int).tolist()
    from_json = build_dataset(cfg.data, "train")  # <root>/cls_labels.json is read first
    assert labels_source(from_json) == str(dst.resolve()) and labels_source(from_npy) == str(npy.resolve())
    for i in range(len(from_npy)):
        np.testing.assert_array_equal(from_json.label_of(i), from_npy.label_of(i))
    # The command: a label file in, its JSON out; a file that is not one: one line, exit status 2.
    with pytest.raises(SystemExit) as done:
        run(convert_workflow.main, [str(npy), str(tmp_path / "out.json")])
    assert done.value.code == 0 and json.loads(capsys.readouterr().out)["ids"] == 3
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY junk")
    with pytest.raises(SystemExit) as done:
        run(convert_workflow.main, [str(tmp_path / "junk.npy")])
    assert done.value.code == 2 and "junk.npy" in capsys.readouterr().err


def test_missing_labels_fall_back_loudly_and_runs_record_the_file(tmp_path, caplog):
    from cpal_ray.engine.inputs import check_training_inputs
    from cpal_ray.inference.manifest import CAM_SCHEMA, ManifestWriter, failed_row, rows_to_table

    make_voc_tree(tmp_path / "voc")
    (tmp_path / "voc" / "cls_labels.npy").unlink()  # a plain VOCdevkit folder: real VOC ids, no label file
    cfg = voc_cfg(tmp_path / "voc")
    with caplog.at_level(logging.WARNING):
        checked = check_training_inputs(cfg)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("bundled:voc12" in m and "cls_labels" in m for m in warning), warning
    assert checked.data.cls_labels == "bundled:voc12"  # the saved config names the labels used
    writer = ManifestWriter(tmp_path / "manifest", CAM_SCHEMA, labels_source="bundled:voc12")
    writer.add(rows_to_table([failed_row(CAM_SCHEMA, "2007_000032", "test")], CAM_SCHEMA))
    writer.flush()
    import pyarrow.parquet as pq

    parts = list((tmp_path / "manifest").glob("*.parquet"))
    assert pq.read_table(parts[0]).column("labels_source").to_pylist() == ["bundled:voc12"]


# ------------------------------------------------------------------------------ scoring

def test_a_missing_mask_is_an_error_never_a_scored_image(tmp_path):
    from cpal_ray.inference.evaluate import evaluate_labels
    from cpal_ray.inference.io import save_label_png

    fake = make_voc_tree(tmp_path / "voc")
    for sid in fake.ids:  # perfect predictions
        save_label_png(tmp_path / "pred" / f"{sid}.png", np.where(fake.masks[sid] == 255, 0, fake.masks[sid]))
    (tmp_path / "voc" / "SegmentationClass" / f"{fake.ids[1]}.png").unlink()
    cfg = load_config(None, {**VOC_SMALL, "data.root": str(tmp_path / "voc"), "data.val_split": "train",
                             "data.on_bad_sample": "skip"})
    scores = evaluate_labels(tmp_path / "pred", build_dataset(cfg.data, "train", train=False))
    assert scores["images"] == 2 and scores["n_errors"] == 1
    assert fake.ids[1] in scores["errors"][0] and "mask missing" in scores["errors"][0]


# ------------------------------------------------------------------------------ training data

def test_on_bad_sample_skip_trains_past_a_truncated_jpeg(tmp_path):
    ids = ("2007_000032", "2007_000039", "2008_000123", "2007_000061")
    make_voc_tree(tmp_path / "voc", ids=ids, num_classes=20)
    jpeg = tmp_path / "voc" / "JPEGImages" / f"{ids[2]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:60])  # truncated: the file exists, the decoder fails
    cfg = voc_cfg(tmp_path / "voc", **{"train.epochs": 1, "cpal.enabled": False})
    with pytest.raises(DataError, match=ids[2]):
        fit_local(cfg)
    out = fit_local(cfg.replace(**{"data.on_bad_sample": "skip"}))
    record = out.history[0]
    assert record["skipped_samples"] == 1 and record["skipped_ids"] == [ids[2]]
    assert record["images"] == 4  # the batch kept its size: the next readable image took the place


# ------------------------------------------------------------------------------ checkpoints

def test_corrupt_checkpoints_are_named_and_never_get_unsafe_advice(tmp_path):
    from cpal_ray.models.weights import read_state_dict

    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "state.pt").write_bytes(os.urandom(4096))
    (tmp_path / "foreign").mkdir()
    torch.save({"model": _RunsCode(tmp_path / "ran")}, tmp_path / "foreign" / "state.pt")
    for name in ("random", "foreign"):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        text = str(err.value)
        assert str(tmp_path / name) in text and "not a cpal-ray checkpoint" in text
        assert "weights_only=False" not in text and "weights_only" not in text.replace("weights-only", "")
    with pytest.raises(CheckpointError, match="no state.pt"):
        load_checkpoint(tmp_path / "nothing-here")
    with pytest.raises(ValueError) as err:
        read_state_dict(tmp_path / "foreign" / "state.pt")
    assert "weights_only=False" not in str(err.value)
    assert not (tmp_path / "ran").exists()


def test_a_damaged_latest_checkpoint_is_skipped_for_the_newest_that_verifies(tmp_path, caplog):
    cfg = tiny_cfg()
    fit_local(cfg, out_dir=tmp_path)
    latest = tmp_path / "epoch_001"
    sums = read_checksums(latest)
    assert set(sums) == {"state.pt", "model.pt", "config.yaml"} and (latest / SUMS_FILE).is_file()
    weights = latest / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit, in the weights torch would load without a word
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"epoch_001/model\.pt: damaged"):
        load_checkpoint(latest)
    with caplog.at_level(logging.WARNING):
        resumed = fit_local(cfg, out_dir=tmp_path)
    assert any("epoch_001/model.pt" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert [h["epoch"] for h in resumed.history] == [1] and resumed.history[0]["start_epoch"] == 1
    assert load_checkpoint(latest)["epoch"] == 2  # rewritten whole by the resumed epoch
    # None verifies: a clear error listing them, never a silent restart from scratch.
    for folder in ("epoch_000", "epoch_001"):
        (tmp_path / folder / "state.pt").write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointError, match="no usable checkpoint among 2"):
        fit_local(cfg, out_dir=tmp_path)


def test_checkpoints_ray_never_registered_are_removed(tmp_path):
    from cpal_ray.distributed.trainer import RUN_RECORD, SNAPSHOT_FILE, remove_unregistered_checkpoints
    from cpal_ray.storage import location

    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02", "checkpoint_2026-01-01_00-00-03"):
        (tmp_path / name).mkdir()
    (tmp_path / "final").mkdir()
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01"},
                                       {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-02"}]}
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    (tmp_path / RUN_RECORD).write_text("{}")  # this project made the folder (else: tests/test_no_silent_loss.py)
    assert remove_unregistered_checkpoints(location(tmp_path)) == ["checkpoint_2026-01-01_00-00-03"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02", "final"]
    (tmp_path / SNAPSHOT_FILE).write_text("{not json")  # unreadable record: remove nothing
    (tmp_path / "checkpoint_2026-01-01_00-00-04").mkdir()
    assert remove_unregistered_checkpoints(location(tmp_path)) == []


# ------------------------------------------------------------------------------ fail fast, write nothing

def _no_ray(*_a, **_k):
    raise AssertionError("Ray was started for an input that cannot work")


def test_training_with_a_missing_dataset_fails_before_ray_and_writes_nothing(tmp_path, monkeypatch):
    from cpal_ray.distributed import trainer

    monkeypatch.setattr(trainer, "build_trainer", _no_ray)
    cfg = voc_cfg(tmp_path / "no-such-voc", **{"train.storage_path": str(tmp_path / "runs"), "train.name": "x"})
    with pytest.raises(DataError, match="no-such-voc"):
        trainer.run_training(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workflow", ["make_cams", "eval_cams", "pseudo_labels"])
def test_pipelines_with_a_missing_checkpoint_start_nothing_and_write_nothing(tmp_path, monkeypatch, capsys, workflow):
    import importlib

    from cpal_ray.distributed import runtime
    from workflows.common import run

    monkeypatch.setattr(runtime, "init_ray", _no_ray)
    module = importlib.import_module(f"workflows.{workflow}")
    with pytest.raises(SystemExit) as done:
        run(module.main, ["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                          "--config", "configs/synthetic_tiny.yaml"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not a cpal-ray checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_mask_written_back_restores_scoring(tmp_path):
    """The mask check looks at the file each time: nothing about a missing mask is cached."""
    fake = make_voc_tree(tmp_path / "voc")
    cfg = load_config(None, {**VOC_SMALL, "data.root": str(tmp_path / "voc")})
    ds = build_dataset(cfg.data, "train", train=False)
    mask = tmp_path / "voc" / "SegmentationClass" / f"{fake.ids[0]}.png"
    mask.unlink()
    with pytest.raises(DataError, match="mask missing"):
        ds.check_mask(0)
    write_mask(mask, fake.masks[fake.ids[0]])
    ds.check_mask(0)


@pytest.mark.parametrize("flag", ["--cams", "--checkpoint"])
def test_eval_cams_on_a_missing_folder_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys, flag):
    from cpal_ray.distributed import runtime
    from workflows import eval_cams
    from workflows.common import run

    monkeypatch.setattr(runtime, "init_ray", _no_ray)
    missing = tmp_path / "no-cams-here"
    with pytest.raises(SystemExit) as done:
        run(eval_cams.main, [flag, str(missing), "--config", "configs/synthetic_tiny.yaml"])
    assert done.value.code == 2 and str(missing) in capsys.readouterr().err
    assert not missing.exists() and list(tmp_path.iterdir()) == []
