"""Storage locations: local folders and s3:// URIs (a local moto server) through one interface,
and the files of checkpoints, configs, reports and manifests written to and read from a bucket."""
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cpal_ray.config import load_config, save_config
from cpal_ray.storage import location

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def bucket(s3_server):
    return s3_server.bucket("cpal-storage-test")


def test_uri_joins_never_go_through_pathlib(bucket):
    assert str(Path("s3://b/runs") / "sweeps") == "s3:/b/runs/sweeps"  # the trap this module avoids
    loc = location(f"{bucket}/runs") / "sweeps" / "k_tau"
    assert str(loc) == f"{bucket}/runs/sweeps/k_tau" and loc.path == "cpal-storage-test/runs/sweeps/k_tau"
    assert loc.name == "k_tau" and str(loc.parent) == f"{bucket}/runs/sweeps" and not loc.is_local
    query = location("s3://b/x?endpoint_override=127.0.0.1:1&scheme=http") / "y"
    assert str(query) == "s3://b/x/y?endpoint_override=127.0.0.1:1&scheme=http" and query.path == "b/x/y"
    assert str(query.parent) == "s3://b/x?endpoint_override=127.0.0.1:1&scheme=http"
    with pytest.raises(TypeError, match="object store"):
        open(loc)  # an object is not a local path


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_write_list_copy_delete(where, bucket, tmp_path):
    root = location(str(tmp_path / "root") if where == "local" else f"{bucket}/rw-{where}")
    f = (root / "a" / "b.bin").write_bytes(b"abc")
    (root / "a" / "c.txt").write_text("hi")
    (root / "d" / "e.bin").write_bytes(b"")
    assert f.is_file() and f.read_bytes() == b"abc" and f.size() == 3 and (root / "a").is_dir()
    assert [p.name for p in (root / "a").list()] == ["b.bin", "c.txt"]
    assert [p.name for p in (root / "a").list(".txt")] == ["c.txt"]
    assert [d.name for d in root.dirs()] == ["a", "d"]
    assert not (root / "nope").exists() and (root / "nope").list() == []
    with pytest.raises(FileNotFoundError, match="nope"):
        (root / "nope").read_bytes()
    copy = (root / "a").copy_to(location(str(tmp_path / "copy")))
    assert (copy / "b.bin").read_bytes() == b"abc" and (copy / "c.txt").read_text() == "hi"
    with (root / "a").local_copy() as local:
        assert (local / "b.bin").read_bytes() == b"abc"
    (root / "a").delete()
    assert not (root / "a").exists() and (root / "d" / "e.bin").is_file()


def test_local_writes_leave_no_partial_file(tmp_path):
    target = location(str(tmp_path / "x.bin")).write_bytes(b"1")
    with pytest.raises(TypeError):
        target.write_bytes(object())  # fails mid-write: the old file stays, no temp file is left
    assert target.read_bytes() == b"1" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_checkpoint_config_report_and_manifest_in_a_bucket(bucket, tmp_path):
    import torch

    from cpal_ray.engine import checkpoint_state, load_checkpoint, load_trained, write_checkpoint
    from cpal_ray.inference.io import load_cams_npz, load_label_png, save_cams_npz, save_label_png
    from cpal_ray.inference.manifest import (LABEL_SCHEMA, ManifestWriter, check_run_spec, consolidate_manifest,
                                             rows_to_table)
    from cpal_ray.inference.metrics import write_report
    from cpal_ray.models import build_model

    cfg = load_config("configs/synthetic_tiny.yaml")
    run = location(f"{bucket}/run")
    model = build_model(cfg.model, cfg.data.num_classes)
    write_checkpoint(run / "ckpt", checkpoint_state(model=model, cfg=cfg, epoch=3, global_step=12))
    state = load_checkpoint(f"{bucket}/run/ckpt")
    assert state["epoch"] == 3 and state["config"] == cfg
    loaded, cfg2, context = load_trained(str(run / "ckpt"))
    assert cfg2 == cfg and context is None
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert load_config(save_config(cfg, run / "config.yaml")) == cfg

    save_cams_npz(run / "cams" / "a.npz", np.array([1]), np.full((1, 4, 5), 0.5))
    classes, cams = load_cams_npz(str(run / "cams" / "a.npz"), expected_classes=[1])
    assert classes.tolist() == [1] and cams.shape == (1, 4, 5)
    save_label_png(run / "labels" / "a.png", np.array([[0, 2], [255, 2]]))
    assert load_label_png(run / "labels" / "a.png").tolist() == [[0, 2], [255, 2]]

    results = {"thresholds": [0.1, 0.2], "miou": [0.3, 0.4], "best_threshold": 0.2, "best_miou": 0.4,
               "iou": [0.5, 0.3], "present": [True, True], "pixel_acc": 0.9}
    paths = write_report(results, run / "seeds", ["background", "a"])
    assert json.loads(paths["json"].read_text())["best_miou"] == 0.4 and paths["png"].size() > 0

    row = {"id": "a", "status": "done", "path": "a.png", "classes": [1], "height": 2, "width": 2, "seconds": 0.1,
           "error": "", "frac_ignored": 0.25, "sha256": "x"}
    writer = ManifestWriter(run / "manifest", LABEL_SCHEMA)
    writer.add(rows_to_table([row], LABEL_SCHEMA))
    writer.flush()
    consolidate_manifest(run / "manifest", run / "manifest.parquet", LABEL_SCHEMA)
    table = pq.read_table(io.BytesIO((run / "manifest.parquet").read_bytes()))
    assert table.column("id").to_pylist() == ["a"]
    check_run_spec(run, {"preset": "irn"})
    with pytest.raises(ValueError, match="preset"):
        check_run_spec(str(run), {"preset": "amn"})
