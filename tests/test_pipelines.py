"""CAM files, seed evaluation and CRF pseudo-labels: the per-image jobs, the Ray Data pipelines
(resume after a crash, bad inputs) and the three workflows.

A tiny model is trained once per module on the synthetic set (``fit_local``, a few seconds);
Ray tests share one local Ray (``ray_start_2_cpus``). Pipeline runs use 10 images.
"""
import filecmp
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from cpal_ray.config import load_config
from cpal_ray.data import build_dataset
from cpal_ray.inference.evaluate import evaluate_cam_dir, evaluate_labels
from cpal_ray.inference.io import CamFileError, LabelFileError, load_cams_npz, load_label_png, save_cams_npz, \
    save_label_png
from cpal_ray.inference.image_jobs import cam_job, validate_label_png
from cpal_ray.inference.manifest import LABEL_SCHEMA, ManifestWriter, check_run_spec, consolidate_manifest, rows_to_table
from cpal_ray.inference.metrics import ConfusionMatrix
from tests.fakes import make_voc_tree

N_IMAGES = 10


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CPAL model trained 4 epochs on 64 synthetic images; its last checkpoint folder."""
    import torch

    from cpal_ray.engine import fit_local

    cfg = load_config("configs/synthetic_tiny.yaml", ["train.epochs=4", "dist.num_workers=1"])
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit_local(cfg, out_dir=out)
    finally:
        torch.set_num_threads(threads)
    # Pipelines: half a CPU per CAM actor and at most 2 CRF actors on the shared 2-CPU Ray.
    infer = cfg.replace(**{"data.synthetic_images": N_IMAGES, "inference.actor_cpus": 0.5, "pseudo.max_actors": 2})
    return SimpleNamespace(cfg=cfg, infer=infer, ckpt=out / "epoch_003", overrides=[f"data.synthetic_images={N_IMAGES}"])


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("*.png"))


def _no_partial_files(folder: Path) -> None:
    leftovers = [p for p in Path(folder).rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not leftovers, leftovers


# ------------------------------------------------------------------------------ no Ray


@pytest.mark.unit
def test_validate_label_png_rejects_truncated_wrong_size_and_values(tmp_path):
    label = np.zeros((20, 30), np.uint8)
    label[5:10, 5:10], label[0] = 3, 255
    path = save_label_png(tmp_path / "a.png", label)
    got, sha = validate_label_png(path, (20, 30), np.array([2]))
    assert np.array_equal(got, label) and len(sha) == 64
    with pytest.raises(LabelFileError, match="values"):
        validate_label_png(path, (20, 30), np.array([0]))       # 3 = class 2 + 1 is not a positive
    with pytest.raises(LabelFileError, match="shape"):
        validate_label_png(path, (30, 20), np.array([2]))
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 12):                 # half a file; everything but IEND
        path.write_bytes(data[:cut])
        with pytest.raises(LabelFileError, match="a.png"):
            validate_label_png(path, (20, 30), np.array([2]))


@pytest.mark.unit
def test_multiscale_flip_beats_single_scale_and_matches_evaluate_seeds(trained, tmp_path, request):
    """Seed mIoU from saved CAM files, multi-scale + flip vs scale 1.0 without flip (32 val images)."""
    import torch

    from cpal_ray.engine import load_trained
    from cpal_ray.inference.evaluate import evaluate_seeds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 shared, busy cores can be many times slower
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    model, cfg, _ = load_trained(trained.ckpt)
    cfg = cfg.replace(**{"data.synthetic_images": 32})
    dataset = build_dataset(cfg.data, "val", train=False)
    scores = {}
    for name, scales, flip in (("single", (1.0,), False), ("multi", (1.0, 0.5, 1.5, 2.0), True)):
        for i in range(len(dataset)):
            row = cam_job(model, dataset, i, tmp_path / name, scales=scales, flip=flip, save_dtype="float32")
            assert row["status"] == "done", row
        scores[name] = evaluate_cam_dir(tmp_path / name, dataset, cfg)
        assert scores[name]["images"] == 32 and scores[name]["n_errors"] == 0
    direct = evaluate_seeds(model, dataset, cfg, scales=(1.0, 0.5, 1.5, 2.0), flip=True)
    assert scores["multi"]["best_miou"] == pytest.approx(direct["best_miou"], abs=1e-9)
    single, multi = scores["single"]["best_miou"], scores["multi"]["best_miou"]
    print(f"\nseed mIoU (32 synthetic val images): single-scale {single:.4f} "
          f"(thr {scores['single']['best_threshold']:.2f}), multi-scale+flip {multi:.4f} "
          f"(thr {scores['multi']['best_threshold']:.2f})")
    assert multi >= single - 0.02


@pytest.mark.unit
def test_evaluate_labels_equals_direct_confusion_matrix(trained, tmp_path):
    dataset = build_dataset(trained.infer.data, "train", train=False)
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(dataset.num_classes + 1)
    ignored = total = 0
    for i, sid in enumerate(dataset.ids):
        mask = dataset.read(i)[1]
        pred = np.where(rng.random(mask.shape) < 0.8, mask, rng.integers(0, 5, mask.shape)).astype(np.uint8)
        pred[rng.random(mask.shape) < 0.1] = 255
        if i == 3:
            continue                                              # no PNG for this id
        save_label_png(tmp_path / f"{sid}.png", pred)
        cm.update(pred, mask, ignore_pred=True)
        ignored, total = ignored + int((pred == 255).sum()), total + pred.size
    res = evaluate_labels(tmp_path, dataset)
    ref = cm.compute()
    assert res["miou"] == pytest.approx(ref["miou"], abs=1e-12)
    assert np.allclose(res["iou"], ref["iou"], equal_nan=True) and res["pixels"] == ref["pixels"]
    assert res["frac_ignored"] == pytest.approx(ignored / total)
    assert res["images"] == N_IMAGES - 1 and res["n_errors"] == 1 and dataset.ids[3] in res["errors"][0]


@pytest.mark.unit
def test_manifest_keeps_latest_row_per_id_and_run_spec_guards_folder(tmp_path):
    def row(sid, status, sha):
        return {"id": sid, "status": status, "path": f"{sid}.png", "classes": [1], "height": 2, "width": 2,
                "seconds": 0.1, "error": "", "frac_ignored": 0.0, "sha256": sha}

    first = ManifestWriter(tmp_path / "manifest", LABEL_SCHEMA, flush_rows=1)
    first.add(rows_to_table([row("a", "done", "1"), row("b", "failed", "")], LABEL_SCHEMA))
    time.sleep(0.001)
    second = ManifestWriter(tmp_path / "manifest", LABEL_SCHEMA)
    second.add(rows_to_table([row("b", "done", "2"), row("c", "done", "3")], LABEL_SCHEMA))
    second.flush()
    (tmp_path / "manifest" / "part-9-broken.parquet").write_bytes(b"PAR1 not parquet")
    table = consolidate_manifest(tmp_path / "manifest", tmp_path / "manifest.parquet", LABEL_SCHEMA)
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("sha256").to_pylist() == ["1", "2", "3"]
    assert pq.read_table(tmp_path / "manifest.parquet").num_rows == 3
    check_run_spec(tmp_path, {"preset": "irn"})
    check_run_spec(tmp_path, {"preset": "irn"})
    with pytest.raises(ValueError, match="preset"):
        check_run_spec(tmp_path, {"preset": "amn"})
    check_run_spec(tmp_path, {"preset": "amn"}, overwrite=True)


# ------------------------------------------------------------------------------ Ray Data


@pytest.fixture(scope="module")
def cams(trained, ray_start_2_cpus, tmp_path_factory):
    """CAM + PACAM files of the 10 synthetic train images, made by the pipeline."""
    from cpal_ray.distributed.stages import run_make_cams

    out = tmp_path_factory.mktemp("cams")
    summary = run_make_cams(trained.infer, trained.ckpt, out, split="train", source="both")
    return SimpleNamespace(dir=out, summary=summary)


@pytest.fixture(scope="module")
def uninterrupted(trained, cams, tmp_path_factory):
    from cpal_ray.distributed.stages import run_pseudo_labels

    out = tmp_path_factory.mktemp("pseudo_ref")
    summary = run_pseudo_labels(trained.infer, out, cam_dir=cams.dir, split="train")
    assert summary.counts == {"done": N_IMAGES, "skipped": 0, "failed": 0}
    return out


@pytest.mark.ray
def test_make_cams_writes_one_valid_npz_per_id_and_resumes(trained, cams):
    from cpal_ray.distributed.stages import run_make_cams

    assert cams.summary.counts == {"done": N_IMAGES, "skipped": 0, "failed": 0}
    dataset = build_dataset(trained.infer.data, "train", train=False)
    for i, sid in enumerate(dataset.ids):
        rgb, _, label = dataset.read(i)
        for path in (cams.dir / f"{sid}.npz", cams.dir / "pacam" / f"{sid}.npz"):
            classes, maps = load_cams_npz(path, expected_classes=np.flatnonzero(label))
            assert maps.shape == (len(classes), *rgb.shape[:2]) and 0 <= maps.min() and maps.max() <= 1
    manifest = pq.read_table(cams.dir / "manifest.parquet")
    assert sorted(manifest.column("id").to_pylist()) == dataset.ids
    assert (cams.dir / "config.yaml").is_file() and (cams.dir / "run_spec.json").is_file()
    # Rerun: every file validates -> skipped; a corrupt one is redone with the same bytes.
    victim = cams.dir / f"{dataset.ids[2]}.npz"
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    summary = run_make_cams(trained.infer, trained.ckpt, cams.dir, split="train", source="both")
    assert summary.counts == {"done": 1, "skipped": N_IMAGES - 1, "failed": 0}
    assert victim.read_bytes() == good
    _no_partial_files(cams.dir)


@pytest.mark.ray
def test_pseudo_labels_after_crash_resume_to_identical_bytes(trained, cams, uninterrupted, tmp_path):
    from cpal_ray.distributed.stages import run_pseudo_labels

    out = tmp_path / "pseudo"
    with pytest.raises(Exception, match="crash_after"):
        run_pseudo_labels(trained.infer.replace(**{"pseudo.max_actors": 1}), out, cam_dir=cams.dir, split="train",
                          crash_after=4)
    dataset = build_dataset(trained.infer.data, "train", train=False)
    written = _pngs(out)
    assert 1 <= len(written) < N_IMAGES
    _no_partial_files(out)
    # A damaged PNG (as a copy tool or disk might leave) must not count as done.
    damaged = out / written[0]
    damaged.write_bytes(damaged.read_bytes()[:-20])
    summary = run_pseudo_labels(trained.infer, out, cam_dir=cams.dir, split="train")
    assert summary.counts == {"done": N_IMAGES - len(written) + 1, "skipped": len(written) - 1, "failed": 0}
    assert _pngs(out) == _pngs(uninterrupted) == [f"{sid}.png" for sid in dataset.ids]
    for name in _pngs(out):
        assert filecmp.cmp(out / name, uninterrupted / name, shallow=False), name
    _no_partial_files(out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["id"] for r in manifest] == sorted(dataset.ids)
    for r in manifest:
        assert r["status"] in ("done", "skipped") and r["error"] == ""
        assert validate_label_png(r["path"], (r["height"], r["width"]), np.array(r["classes"]))[1] == r["sha256"]
    # Pseudo-label mIoU: the evaluator equals a direct confusion matrix over the PNGs.
    cm = ConfusionMatrix(dataset.num_classes + 1)
    for i, sid in enumerate(dataset.ids):
        cm.update(load_label_png(out / f"{sid}.png"), dataset.read(i)[1], ignore_pred=True)
    assert evaluate_labels(out, dataset)["miou"] == pytest.approx(cm.compute()["miou"], abs=1e-12)
    # Another preset into the same folder is refused (its PNGs would be stale).
    with pytest.raises(ValueError, match="other settings"):
        run_pseudo_labels(trained.infer.replace(**{"pseudo.preset": "amn"}), out, cam_dir=cams.dir, split="train")


@pytest.mark.ray
def test_pseudo_labels_workflow_on_the_fly_matches_saved_cams(trained, uninterrupted, tmp_path, capsys):
    from workflows import pseudo_labels

    out = tmp_path / "fly"
    rc = pseudo_labels.main(["--checkpoint", str(trained.ckpt), "--split", "train", "--out", str(out),
                             "--crf-actors", "2", *trained.overrides])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["run"]["done"] == N_IMAGES, report
    assert _pngs(out) == _pngs(uninterrupted)
    for name in _pngs(out):
        assert filecmp.cmp(out / name, uninterrupted / name, shallow=False), name
    scores = json.loads((out / "pseudo_labels_miou.json").read_text())
    dataset = build_dataset(trained.infer.data, "train", train=False)
    direct = evaluate_labels(uninterrupted, dataset)  # the same PNGs, scored by the library
    assert scores["images"] == N_IMAGES and scores["miou"] == pytest.approx(direct["miou"], abs=1e-12)
    assert scores["frac_ignored"] == pytest.approx(direct["frac_ignored"], abs=1e-12)
    assert (out / "config.yaml").is_file() and len(list((out / "cams").glob("*.npz"))) == N_IMAGES
    print(f"\npseudo-label mIoU (IRN preset, {N_IMAGES} synthetic train images): {scores['miou']:.4f}, "
          f"ignored {scores['frac_ignored']:.3f}")


@pytest.mark.ray
def test_make_cams_and_eval_cams_workflows(trained, tmp_path, capsys):
    from workflows import eval_cams, make_cams

    cams = tmp_path / "cams"
    assert make_cams.main(["--checkpoint", str(trained.ckpt), "--split", "val", "--out", str(cams),
                           "--cam-cpus", "0.5", *trained.overrides]) == 0
    assert len(list(cams.glob("*.npz"))) == N_IMAGES and (cams / "config.yaml").is_file()
    assert eval_cams.main(["--cams", str(cams)]) == 0                  # default --out: <cams>/seeds
    seeds = json.loads((cams / "seeds" / "seeds.json").read_text())
    assert len(seeds["thresholds"]) == 96 and seeds["images"] == N_IMAGES
    assert len(seeds["iou"]) == trained.cfg.data.num_classes + 1
    for name in ("seeds.md", "miou_vs_threshold.png", "config.yaml"):
        assert (cams / "seeds" / name).is_file()
    assert eval_cams.main(["--checkpoint", str(trained.ckpt), "--source", "pacam", "--threshold", "0.3",
                           "--out", str(tmp_path / "pacam"), *trained.overrides]) == 0
    pacam = json.loads((tmp_path / "pacam" / "seeds.json").read_text())
    assert pacam["thresholds"] == [0.3] and pacam["images"] == N_IMAGES
    capsys.readouterr()


@pytest.mark.ray
def test_bad_inputs_are_named_and_the_rest_finishes(ray_start_2_cpus, tmp_path, capsys):
    """Missing image, corrupt image, corrupt CAM file, CAM file of the wrong classes."""
    from cpal_ray.engine import checkpoint_state, write_checkpoint
    from cpal_ray.models import build_model
    from workflows import make_cams, pseudo_labels

    ids = [f"2007_{i:06d}" for i in range(6)]
    fake = make_voc_tree(tmp_path / "voc", ids=ids, size=(40, 48))
    cfg = load_config("configs/synthetic_tiny.yaml", ["data.dataset=voc", f"data.root={fake.root}",
                                                      "inference.scales=[1.0]", "dist.num_workers=1"])
    write_checkpoint(tmp_path / "ckpt", checkpoint_state(model=build_model(cfg.model, cfg.data.num_classes), cfg=cfg,
                                                          epoch=0))
    fake.image(ids[0]).unlink()                                   # missing image
    fake.image(ids[1]).write_bytes(b"not a jpeg")                 # corrupt image
    cams = tmp_path / "cams"
    rc = make_cams.main(["--checkpoint", str(tmp_path / "ckpt"), "--split", "train", "--out", str(cams),
                         "--cam-cpus", "0.5"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and (report["done"], report["failed"]) == (4, 2), report
    assert sorted(f[0] for f in report["failures"]) == ids[:2]
    assert all(f[1].startswith(f"id {f[0]}:") and f[0] in f[1][len(f[0]) + 4:] for f in report["failures"])
    (cams / f"{ids[2]}.npz").write_bytes(b"PK\x03\x04 truncated")    # corrupt CAM file
    save_cams_npz(cams / f"{ids[3]}.npz", np.array([7]), np.zeros((1, 40, 48)))  # wrong classes
    with pytest.raises(CamFileError, match="classes"):
        load_cams_npz(cams / f"{ids[3]}.npz", expected_classes=np.flatnonzero(fake.labels[ids[3]]))
    out = tmp_path / "pseudo"
    rc = pseudo_labels.main(["--cams", str(cams), "--split", "train", "--out", str(out), "--crf-actors", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and (report["run"]["done"], report["run"]["failed"]) == (2, 4), report
    errors = dict(report["run"]["failures"])
    assert sorted(errors) == ids[:4]
    assert "CamFileError" in errors[ids[2]] and "classes" in errors[ids[3]]
    assert _pngs(out) == [f"{ids[4]}.png", f"{ids[5]}.png"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["id"]: r["status"] for r in manifest} == {**{s: "failed" for s in ids[:4]}, ids[4]: "done", ids[5]: "done"}
    assert report["miou"]["images"] == 2
    _no_partial_files(out)


def _kill_ray_session_of(driver_pid: int) -> None:
    """SIGKILL what is left of the local Ray a killed driver started (its node agents outlive it):
    the processes holding files of ``/tmp/ray/session_*_<driver_pid>/``, and only those."""
    tag = f"_{driver_pid}/"
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            links = [os.readlink(fd) for fd in (proc_dir / "fd").iterdir()]
        except OSError:
            continue
        if any("/ray/session_" in link and tag in link for link in links):
            try:
                os.kill(int(proc_dir.name), 9)
            except ProcessLookupError:
                pass


def test_sigkill_then_rerun_gives_identical_pngs(trained, cams, uninterrupted, tmp_path):
    """A real kill: the workflow (own local Ray) is SIGKILLed mid-run, then started again."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "workflows.pseudo_labels", "--cams", str(cams.dir), "--split", "train",
           "--out", str(out), "--num-cpus", "2", "--crf-actors", "1", "--no-eval", *trained.overrides]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(_pngs(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    _kill_ray_session_of(proc.pid)
    assert 3 <= len(_pngs(out)) < N_IMAGES, "the run finished before it could be killed"
    _no_partial_files(out)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    for name in _pngs(uninterrupted):
        assert filecmp.cmp(out / name, uninterrupted / name, shallow=False), name
