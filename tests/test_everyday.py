"""Everyday use (issue 27, items 1-5): files others can read, JSON any parser reads, Ctrl-C that
says where to resume, and the checks of make-cams / eval-cams before anything starts."""
import json
import os
import stat

import pandas as pd
import pytest

from cpal_ray.formatting import strict_json
from cpal_ray.storage import location

pytestmark = pytest.mark.unit


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's and Go's parsers do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        target = location(str(tmp_path / "sub" / "x.json")).write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target.path).st_mode) == mode


def test_strict_json_has_no_nan_or_infinity():
    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}, "e": object})
    assert strict_loads(text)["a"] is None and strict_loads(text)["b"] == [None, 1.5]


def test_history_of_ray_train_has_no_nan_where_an_epoch_reported_nothing(tmp_path):
    from cpal_ray.distributed.trainer import history_records

    frame = pd.DataFrame([{"epoch": 0, "loss": 0.5, "bank_at_start": {"bank_keys": 0}}, {"epoch": 1, "loss": 0.4}])
    history = history_records(frame)
    assert history == [{"epoch": 0, "loss": 0.5, "bank_at_start": {"bank_keys": 0}}, {"epoch": 1, "loss": 0.4}]
    assert strict_loads(strict_json(history))[1] == {"epoch": 1, "loss": 0.4}


def run_cli(*args, timeout=120, **popen):
    """The console script in a subprocess, as a user runs it (``cpal-ray`` = ``python -m workflows.cli``)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": REPO})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained checkpoint of the synthetic config (8 images per split), written in milliseconds."""
    from cpal_ray.config import load_config
    from cpal_ray.engine import checkpoint_state, write_checkpoint
    from cpal_ray.models import build_model

    cfg = load_config("configs/synthetic_tiny.yaml", ["data.synthetic_images=8", "inference.scales=[1.0]"])
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    write_checkpoint(folder, checkpoint_state(model=build_model(cfg.model, cfg.data.num_classes), cfg=cfg, epoch=1))
    return folder


def test_make_cams_into_a_folder_of_other_settings_is_refused_before_ray_starts(tiny_checkpoint, tmp_path):
    from cpal_ray.inference.manifest import check_run_spec

    out = tmp_path / "cams"
    check_run_spec(out, {"dataset": "voc", "split": "val"})  # what an earlier make-cams of other settings left
    proc = run_cli("make-cams", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--address", "local")
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line: no Ray start-up logs, no traceback
    assert line.startswith(f"error: {out}: holds outputs made with other settings") and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["run_spec.json"]  # nothing written


def _cam_folder(folder, dataset, ids):
    """CAM files and a manifest for ``ids``, as ``make-cams --limit`` leaves them."""
    import numpy as np

    from cpal_ray.data.classes import positive_classes
    from cpal_ray.inference.io import save_cams_npz
    from cpal_ray.inference.manifest import CAM_SCHEMA, ManifestWriter, consolidate_manifest, manifest_row, \
        rows_to_table

    rows = []
    for sid in ids:
        _, mask, label = dataset.read(dataset.ids.index(sid))
        classes = positive_classes(label)
        rng = np.random.default_rng(0)
        save_cams_npz(folder / f"{sid}.npz", classes, rng.random((len(classes), *np.asarray(mask).shape)))
        rows.append(manifest_row(CAM_SCHEMA, sid, status="done", path=str(folder / f"{sid}.npz")))
    writer = ManifestWriter(folder / "manifest", CAM_SCHEMA)
    writer.add(rows_to_table(rows, CAM_SCHEMA))
    writer.flush()
    consolidate_manifest(folder / "manifest", folder / "manifest.parquet", CAM_SCHEMA)


def test_eval_cams_scores_the_images_the_cam_folders_manifest_lists(tmp_path, capsys):
    from cpal_ray.config import load_config, save_config
    from cpal_ray.data import build_dataset
    from workflows import eval_cams

    cfg = load_config("configs/synthetic_tiny.yaml", ["data.synthetic_images=8"])
    dataset = build_dataset(cfg.data, "val", train=False)
    assert len(dataset) > 4
    cams = tmp_path / "cams"
    _cam_folder(cams, dataset, dataset.ids[:4])  # make-cams --limit 4
    save_config(cfg, cams / "config.yaml")
    assert eval_cams.main(["--cams", str(cams)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["images"], report["n_errors"]) == (4, 0)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{dataset.ids[0]}\n# a comment\n{dataset.ids[5]}\n")  # --ids: these instead
    assert eval_cams.main(["--cams", str(cams), "--ids", str(ids), "--out", str(tmp_path / "seeds")]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["images"], report["n_errors"]) == (1, 1) and report["errors"][0].startswith(f"id {dataset.ids[5]}:")


def _start(*args, run_dir=None):
    """The console script in its own session, as a terminal runs it (Ctrl-C goes to its process group)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    return subprocess.Popen([sys.executable, "-m", "workflows.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": REPO}, preexec_fn=_terminal_sigint)


def _terminal_sigint():
    """SIGINT as a terminal's foreground job has it: a suite started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python would then never raise
    KeyboardInterrupt in the command under test."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c(proc, timeout=180):
    import signal

    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_ctrl_c_during_start_up_is_one_line_and_exit_130():
    import time

    proc = _start("train", "--config", "configs/synthetic_tiny.yaml", "--address", "local")
    # Start-up for sure: torch's library is mapped (its import has begun), Ray has not started yet.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
        time.sleep(0.01)
    code, err = _ctrl_c(proc)
    assert code == 130 and err.strip().splitlines() == ["interrupted"], err


@pytest.mark.ray
def test_ctrl_c_mid_run_says_where_it_resumes_and_history_lists_only_checkpointed_epochs(tmp_path):
    import re
    import time

    from cpal_ray.distributed.interrupt import SNAPSHOT_FILE

    proc = _start("train", "--config", "configs/synthetic_tiny.yaml", "--num-cpus", "2", "train.epochs=30",
                  f"train.storage_path={tmp_path}", "train.name=run")
    run, deadline = tmp_path / "run", time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:  # until Ray Train registered a checkpoint
        if (run / SNAPSHOT_FILE).is_file() and json.loads((run / SNAPSHOT_FILE).read_text())["checkpoint_results"]:
            break
        time.sleep(0.2)
    code, err = _ctrl_c(proc)
    assert code == 130, err[-3000:]
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at epoch (\d+) \((\d+) of 30 epochs checkpointed\); "
                         r"run the same command to resume from epoch (\d+)", line)
    assert match and len(set(match.groups())) == 1, line
    done = int(match.group(1))
    registered = json.loads((run / SNAPSHOT_FILE).read_text())["checkpoint_results"]
    assert done == max(r["metrics"]["epoch"] for r in registered) + 1
    assert [r["epoch"] for r in strict_loads((run / "history.json").read_text())] == list(range(done))
