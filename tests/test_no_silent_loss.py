"""Nothing lost or mixed silently (issue 24): every file of a checkpoint is verified before it is
resumed, exported or read; a resume checks its config; run names stay in their storage folder.

Each test here fails on the code before the fix (a bit-flipped ``model.pt`` was exported as the
final model, a damaged ``config.yaml`` was read as defaults, ...). The Ray side (a real resume
past a damaged checkpoint) is in tests/test_resume_ray.py.
"""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from cpal_ray.config import ConfigError, config_yaml, load_config
from cpal_ray.engine import CheckpointError, Hook, checkpoint_state, fit_local, load_checkpoint, write_checkpoint
from cpal_ray.engine.checkpoint import SUMS_FILE
from cpal_ray.storage import location

pytestmark = pytest.mark.unit


def tiny_cfg(**over):
    return load_config("configs/synthetic_tiny.yaml", over)


def flip_bit(path, at: float = 0.5) -> None:
    """One flipped bit: a copy torch or YAML would still read without a word."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


def small_checkpoint(folder, cfg=None, epoch: int = 1):
    state = checkpoint_state(model=torch.nn.Linear(3, 2), cfg=cfg or tiny_cfg(), epoch=epoch, global_step=4)
    return write_checkpoint(folder, state)


# ------------------------------------------------------------------------------ item 1: verified files

@pytest.mark.parametrize("name", ["state.pt", "model.pt", "config.yaml"])
def test_every_file_of_a_checkpoint_is_verified_with_a_bit_flip(tmp_path, name):
    small_checkpoint(tmp_path / "ck")
    assert load_checkpoint(tmp_path / "ck")["epoch"] == 1
    flip_bit(tmp_path / "ck" / name)
    with pytest.raises(CheckpointError, match=rf"ck/{name}: damaged"):
        load_checkpoint(tmp_path / "ck")


def test_a_damaged_checksum_record_checks_nothing_and_is_refused(tmp_path):
    small_checkpoint(tmp_path / "ck")
    sums = tmp_path / "ck" / SUMS_FILE
    lines = sums.read_text().splitlines()
    sums.write_text("\n".join([lines[0], lines[1].replace("model.pt", "m0del.pt"), lines[2]]) + "\n")
    with pytest.raises(CheckpointError, match=r"SHA256SUMS: does not list model\.pt"):
        load_checkpoint(tmp_path / "ck")
    sums.write_text(lines[0][:20] + "\n")
    with pytest.raises(CheckpointError, match="SHA256SUMS: line 1"):
        load_checkpoint(tmp_path / "ck")


def test_export_final_refuses_a_bit_flipped_model_and_writes_nothing(tmp_path):
    from cpal_ray.distributed.trainer import export_final

    small_checkpoint(tmp_path / "ck")
    export_final(location(tmp_path / "ck"), location(tmp_path / "good"), history=[])
    assert load_checkpoint(tmp_path / "good")["epoch"] == 1 and (tmp_path / "good" / SUMS_FILE).is_file()
    flip_bit(tmp_path / "ck" / "model.pt")
    with pytest.raises(CheckpointError, match=r"ck/model\.pt: damaged"):
        export_final(location(tmp_path / "ck"), location(tmp_path / "final"), history=[])
    assert not (tmp_path / "final").exists()


def test_a_damaged_config_of_a_checkpoint_is_refused_never_read_as_defaults(tmp_path):
    from workflows.common import config_from_folders

    small_checkpoint(tmp_path / "ck")
    args = SimpleNamespace(config=None, overrides=[])
    assert config_from_folders(args, tmp_path / "ck").model.backbone == "tiny"
    config = tmp_path / "ck" / "config.yaml"
    text = config.read_text()
    config.write_text(text[: text.index("model:")])  # the model section lost: it would read as resnet50
    with pytest.raises(CheckpointError, match=r"ck/config\.yaml: damaged"):
        config_from_folders(args, tmp_path / "ck")


# ------------------------------------------------------------------------------ item 2: resume checks its config

class LrAtStart(Hook):
    """Records the lr of every param group when each epoch starts."""

    def __init__(self):
        self.lrs = {}

    def before_epoch(self, state) -> None:
        self.lrs[state.epoch] = [g["lr"] for g in state.optimizer.param_groups]


def short_cfg(**over):
    return tiny_cfg(**{"train.epochs": 1, "train.log_every": 100, "dist.num_workers": 1,
                       "train.max_steps_per_epoch": 2, "train.diag_images": 0, "cpal.warmup_cluster_steps": 0,
                       **over})


def test_more_epochs_on_a_finished_run_follow_the_new_schedule_not_lr_0(tmp_path, caplog):
    fit_local(short_cfg(), out_dir=tmp_path / "run")
    resumed, fresh = LrAtStart(), LrAtStart()
    with caplog.at_level(logging.INFO, logger="cpal_ray.engine.fit"):
        out = fit_local(short_cfg(**{"train.epochs": 2}), out_dir=tmp_path / "run", hooks=[resumed])
    assert [h["epoch"] for h in out.history] == [1] and out.history[0]["start_epoch"] == 1
    fit_local(short_cfg(**{"train.epochs": 2}), hooks=[fresh])  # the same 2 epochs in one go
    assert min(resumed.lrs[1]) > 0
    assert resumed.lrs[1] == pytest.approx(fresh.lrs[1], rel=1e-6)
    assert "resuming synthetic-tiny from epoch 1 of 2; changed: train.epochs 1 -> 2" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "epoch_001")["config"].train.epochs == 2


@pytest.mark.parametrize("field,value", [("model.proj_dim", 16), ("cpal.tau", 0.3), ("train.seed", 7),
                                         ("data.synthetic_images", 16)])
def test_a_resume_with_another_model_data_cpal_or_seed_is_refused_in_one_line(tmp_path, field, value):
    fit_local(short_cfg(), out_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"cannot resume with a different {field} ") as err:
        fit_local(short_cfg(**{field: value, "train.epochs": 2}), out_dir=tmp_path / "run")
    assert len(str(err.value).splitlines()) == 1 and "train.name" in str(err.value)
    assert not (tmp_path / "run" / "epoch_001").exists()


def test_a_checkpoint_of_another_network_is_a_checkpoint_error_not_a_traceback(tmp_path):
    from cpal_ray.engine import fit

    fit_local(short_cfg(), out_dir=tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "epoch_000")
    state["model"] = torch.nn.Linear(3, 2).state_dict()
    with pytest.raises(CheckpointError, match="weights do not fit the tiny network"):
        fit(short_cfg(**{"train.epochs": 2}), resume=state)


def test_run_training_compares_configs_before_ray_and_keeps_the_saved_one(tmp_path, monkeypatch):
    from cpal_ray.distributed import trainer

    monkeypatch.setattr(trainer, "build_trainer", _no_ray)
    monkeypatch.setattr(trainer, "create_bank_actors", _no_ray)
    monkeypatch.setattr(trainer, "remove_bank_actor", lambda name: None)
    cfg = short_cfg(**{"train.storage_path": str(tmp_path), "train.name": "run"})
    run = tmp_path / "run"
    small_checkpoint(run / "checkpoint_2026-01-01_00-00-01", cfg)
    (run / trainer.SNAPSHOT_FILE).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01"}]}))
    (run / trainer.RUN_RECORD).write_text("{}")
    (run / "config.yaml").write_text(config_yaml(cfg))
    with pytest.raises(ConfigError, match=r"cannot resume with a different cpal\.tau"):
        trainer.run_training(cfg.replace(**{"cpal.tau": 0.3}))
    assert load_config(run / "config.yaml").cpal.tau == cfg.cpal.tau  # not overwritten
    with pytest.raises(AssertionError, match="Ray was started"):  # epochs may change: it gets to Ray
        trainer.run_training(cfg.replace(**{"train.epochs": 3}))
    assert load_config(run / "config.yaml").train.epochs == 3


# ------------------------------------------------------------------------------ item 3: run names stay home

@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "", "a\\b", "x y"])
def test_a_run_name_is_one_safe_folder_name(name):
    with pytest.raises(ConfigError, match="train.name: must be one folder name"):
        tiny_cfg(**{"train.name": name})
    tiny_cfg(**{"train.name": "t2-k10_s0.v2"})


def test_location_join_never_leaves_the_folder(tmp_path):
    base = location(tmp_path / "runs")
    assert (base / "a" / "b").path == str(tmp_path / "runs" / "a" / "b")
    for bad in ("..", "a/../../x", "../x"):
        with pytest.raises(ValueError, match=r"leaves the folder"):
            base.join(bad)
    with pytest.raises(ValueError, match=r"leaves the folder"):
        location("s3://bucket/runs") / ".."


def test_foreign_checkpoints_are_never_deleted(tmp_path, monkeypatch):
    from cpal_ray.distributed import trainer

    monkeypatch.setattr(trainer, "build_trainer", _no_ray)
    monkeypatch.setattr(trainer, "create_bank_actors", _no_ray)
    monkeypatch.setattr(trainer, "remove_bank_actor", lambda name: None)
    cfg = short_cfg(**{"train.storage_path": str(tmp_path), "train.name": "run"})
    hand = tmp_path / "run" / "checkpoint_2026-01-01_00-00-01"  # copied by hand: no record of either kind
    hand.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"run: holds 1 checkpoint folder.*no \.cpal-ray-run\.json.*move them"):
        trainer.run_training(cfg)
    with pytest.raises(CheckpointError, match="no .cpal-ray-run.json"):
        trainer.remove_unregistered_checkpoints(location(tmp_path / "run"))
    (tmp_path / "run" / trainer.RUN_RECORD).write_text("{}")  # ours, but Ray recorded none of them
    with pytest.raises(CheckpointError, match="no checkpoint_manager_snapshot.json"):
        trainer.run_training(cfg)
    assert hand.is_dir() and not (tmp_path / "run" / "config.yaml").exists()


def _no_ray(*_a, **_k):
    raise AssertionError("Ray was started")


# ------------------------------------------------------------------------------ item 4: stale outputs

def test_a_model_retrained_into_the_same_folder_is_another_run_spec(tmp_path):
    from cpal_ray.distributed.stage_inputs import with_checkpoint_digest
    from cpal_ray.inference.manifest import check_run_spec

    small_checkpoint(tmp_path / "final", epoch=1)
    spec = {"dataset": "synthetic", "checkpoint": str(tmp_path / "final")}
    check_run_spec(tmp_path / "out", with_checkpoint_digest(spec))
    check_run_spec(tmp_path / "out", with_checkpoint_digest(spec))  # the same model: resumes
    small_checkpoint(tmp_path / "final", epoch=2)  # retrained: same path, other weights
    with pytest.raises(ValueError, match="other settings.*checkpoint_sha256"):
        check_run_spec(tmp_path / "out", with_checkpoint_digest(spec))


def test_a_valid_png_whose_sha256_differs_from_its_manifest_row_is_redone(tmp_path):
    import numpy as np

    from cpal_ray.inference.image_jobs import label_job
    from cpal_ray.inference.manifest import LABEL_SCHEMA, ManifestWriter, rows_to_table

    dataset = SimpleNamespace(ids=["img.v2"], label_of=lambda i: np.array([0.0, 1.0, 0.0]),
                              image_size=lambda i: (4, 5), num_classes=3)
    made = np.full((4, 5), 2, np.uint8)
    first = label_job(dataset, 0, tmp_path, lambda classes, hw: made)
    assert first["status"] == "done"
    writer = ManifestWriter(tmp_path / "manifest", LABEL_SCHEMA)
    writer.add(rows_to_table([first], LABEL_SCHEMA))
    writer.flush()
    assert label_job(dataset, 0, tmp_path, lambda classes, hw: made)["status"] == "skipped"
    from cpal_ray.inference.io import encode_label_png

    (tmp_path / "img.v2.png").write_bytes(encode_label_png(np.zeros((4, 5), np.uint8)))  # valid, not this run's
    again = label_job(dataset, 0, tmp_path, lambda classes, hw: made)
    assert again["status"] == "done" and again["sha256"] == first["sha256"]


# ------------------------------------------------------------------------------ item 5: decompression bombs

def bomb_png(path, width: int = 100_000, height: int = 100_000) -> None:
    """A 100-byte PNG whose header claims ``width`` x ``height`` pixels (10^10 by default)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def pixel_limit():
    from cpal_ray.data.files import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels

    yield set_max_image_pixels
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS)


def test_every_reader_refuses_a_decompression_bomb_naming_the_file(tmp_path, pixel_limit):
    import numpy as np

    from cpal_ray.data import DataError, build_dataset
    from cpal_ray.data.files import decode_label_png, read_mask, read_rgb
    from cpal_ray.inference.io import LabelFileError, load_label_png
    from tests.fakes import make_voc_tree

    bomb = tmp_path / "bomb.png"
    bomb_png(bomb)
    for read in (lambda: read_rgb(bomb, "b"), lambda: read_mask(bomb, "b", 20, (4, 4)),
                 lambda: decode_label_png(bomb.read_bytes(), bomb, "b", 20, (4, 4))):
        with pytest.raises(DataError, match=r"bomb\.png: .*decompression bomb.*id b"):
            read()
    with pytest.raises(LabelFileError, match=r"bomb\.png: .*decompression bomb"):
        load_label_png(bomb)
    fake = make_voc_tree(tmp_path / "voc")
    bomb_png(tmp_path / "voc" / "JPEGImages" / f"{fake.ids[1]}.jpg")
    ds = build_dataset(load_config(None, {"data.root": str(tmp_path / "voc"), "data.dataset": "voc"}).data, "train",
                       train=False)
    for read in (lambda: ds.image_size(1), lambda: ds.read_image(1)):
        with pytest.raises(DataError, match=rf"{fake.ids[1]}\.jpg: .*decompression bomb"):
            read()
    # Under PIL's own limit but over data.max_image_pixels: refused from the header, never decoded.
    from PIL import Image

    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "big.png")
    pixel_limit(1000)
    with pytest.raises(DataError, match=r"big\.png: image of 30x40 pixels is over data\.max_image_pixels=1000"):
        read_rgb(tmp_path / "big.png", "big")


def test_a_bomb_in_training_is_a_skipped_sample_with_on_bad_sample_skip(tmp_path, pixel_limit):
    from tests.fakes import make_voc_tree
    from tests.test_safety import voc_cfg

    ids = ("2007_000032", "2007_000039", "2008_000123", "2007_000061")
    make_voc_tree(tmp_path / "voc", ids=ids, num_classes=20)
    bomb_png(tmp_path / "voc" / "SegmentationClass" / f"{ids[2]}.png")  # read with its image
    cfg = voc_cfg(tmp_path / "voc", **{"train.epochs": 1, "cpal.enabled": False, "data.on_bad_sample": "skip"})
    record = fit_local(cfg).history[0]
    assert record["skipped_samples"] == 1 and record["skipped_ids"] == [ids[2]]


# ------------------------------------------------------------------------------ item 6: credentials in URIs

@pytest.mark.parametrize("uri", ["s3://AKIAEXAMPLEKEY:wJalrSECRETexample@bucket/runs",
                                 "gs://AKIAEXAMPLEKEY@bucket/runs?endpoint_override=h:9",
                                 "hdfs://AKIAEXAMPLEKEY:wJalrSECRETexample@namenode:8020/runs"])
def test_a_uri_with_credentials_is_refused_without_echoing_them(uri):
    from cpal_ray.storage import StorageError

    with pytest.raises(StorageError) as err:
        location(uri)
    text = str(err.value)
    assert "AKIAEXAMPLEKEY" not in text and "wJalrSECRETexample" not in text and len(text.splitlines()) == 1
    assert "must not hold credentials" in text and "<user info>@" in text


def test_a_workflow_given_credentials_in_a_uri_says_one_line_without_them(tmp_path, monkeypatch, capsys):
    from cpal_ray.distributed import runtime
    from workflows import make_cams
    from workflows.common import run

    monkeypatch.setattr(runtime, "init_ray", _no_ray)
    with pytest.raises(SystemExit) as done:
        run(make_cams.main, ["--checkpoint", "s3://AKIAEXAMPLEKEY:wJalrSECRETexample@bucket/run/final",
                             "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.splitlines()) == 1
    assert "wJalrSECRETexample" not in err and "AKIAEXAMPLEKEY" not in err and "must not hold credentials" in err


# ------------------------------------------------------------------------------ item 9: leftover temp files

def killed_writer_leftover(folder, name: str):
    """What a writer of ``cpal_ray.storage`` killed mid-write leaves: its hidden temporary file."""
    import os
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.write(fd, b"half a file")
    os.close(fd)
    return tmp


def test_the_next_run_of_a_stage_removes_its_killed_writers_temp_files(tmp_path, monkeypatch):
    import os

    from cpal_ray.distributed import trainer
    from cpal_ray.inference.manifest import check_run_spec

    out = tmp_path / "labels"
    leftovers = [killed_writer_leftover(out, "a.png"), killed_writer_leftover(out / "cams", "a.npz")]
    (out / "notes.tmp").write_text("not ours")
    check_run_spec(out, {"preset": "irn"})
    assert not any(os.path.exists(p) for p in leftovers) and (out / "notes.tmp").is_file()

    run = tmp_path / "local"
    fit_local(short_cfg(), out_dir=run)
    leftovers = [killed_writer_leftover(run, "history.json"), killed_writer_leftover(run / "epoch_000", "state.pt")]
    fit_local(short_cfg(**{"train.epochs": 2}), out_dir=run)
    assert not any(os.path.exists(p) for p in leftovers)

    monkeypatch.setattr(trainer, "build_trainer", _no_ray)
    monkeypatch.setattr(trainer, "create_bank_actors", _no_ray)
    monkeypatch.setattr(trainer, "remove_bank_actor", lambda name: None)
    leftover = killed_writer_leftover(tmp_path / "ray-run", "config.yaml")
    with pytest.raises(AssertionError, match="Ray was started"):
        trainer.run_training(short_cfg(**{"train.storage_path": str(tmp_path), "train.name": "ray-run"}))
    assert not os.path.exists(leftover)


# ------------------------------------------------------------------------------ item 8: ids with a dot

def test_ids_are_kept_as_written_dots_included(tmp_path):
    from cpal_ray.data.files import read_id_list

    ids = tmp_path / "train.txt"
    ids.write_text("img.v2\n2007_000032\nscan.2024.01  # a comment\nphoto.v3.jpg\n"
                   "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\nx.PNG\n")
    assert read_id_list(ids) == ["img.v2", "2007_000032", "scan.2024.01", "photo.v3", "2007_000039", "x"]


# ------------------------------------------------------------------------------ item 7: sweep --restore

def test_sweep_restore_refuses_a_folder_without_our_record_before_unpickling(tmp_path, capsys):
    import pickle

    from cpal_ray.distributed.tune import restore_sweep
    from tests.test_safety import _RunsCode
    from workflows import sweep

    marker, folder = tmp_path / "code-ran", tmp_path / "exp"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(FileNotFoundError, match=r"exp: not a cpal-ray sweep folder \(no sweep\.json\).*unpickles"):
        restore_sweep(folder)
    (folder / "sweep.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"sweep\.json: not a cpal-ray sweep record \(no base, space, rows"):
        restore_sweep(folder)
    assert not marker.exists()
    with pytest.raises(SystemExit):
        sweep.parse_args(["--help"])
    assert "Ray Tune unpickles its tuner.pkl" in " ".join(capsys.readouterr().out.split())


def test_a_sweep_name_is_one_safe_folder_name_too(monkeypatch, capsys):
    from cpal_ray.distributed import runtime
    from workflows import sweep
    from workflows.common import run

    monkeypatch.setattr(runtime, "init_ray", _no_ray)
    with pytest.raises(SystemExit) as done:
        run(sweep.main, ["--space", "k_tau", "--name", "..", "--config", "configs/synthetic_tiny.yaml"])
    assert done.value.code == 2 and "--name: must be one folder name" in capsys.readouterr().err


def test_a_run_of_an_older_cpal_ray_still_resumes_and_a_foreign_one_does_not(tmp_path):
    from cpal_ray.distributed import trainer

    run = tmp_path / "run"
    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02"):
        (run / name).mkdir(parents=True)
    (run / trainer.SNAPSHOT_FILE).write_text(json.dumps(
        {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-01"}]}))
    (run / "config.yaml").write_text(config_yaml(short_cfg(**{"train.name": "other"})))  # not this run's
    with pytest.raises(CheckpointError, match="no record of writing"):
        trainer.remove_unregistered_checkpoints(location(run))
    (run / "config.yaml").write_text(config_yaml(short_cfg(**{"train.name": "run"})))  # no RUN_RECORD yet
    assert trainer.remove_unregistered_checkpoints(location(run)) == ["checkpoint_2026-01-01_00-00-02"]
