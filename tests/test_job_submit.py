"""`ray job submit` against the session's local head (token auth left on, as Ray 2.60 defaults).

The job server is the dashboard of the tests' shared Ray (``conftest.ray_session``).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job_server(ray_session):
    return ray_session.dashboard


def test_job_submit_runs_tiny_config_to_succeeded(job_server, tmp_path, monkeypatch):
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [str(ray_cli), "job", "submit", "--address", job_server, "--working-dir", str(REPO), "--",
           sys.executable, "-m", "workflows.train", "--config", "configs/synthetic_tiny.yaml",
           f"train.storage_path={tmp_path}", "train.name=jobrun", "train.epochs=1", "train.max_steps_per_epoch=2",
           "dist.cpus_per_worker=0.4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    job_id = next(w.strip("'") for line in out.splitlines() if "Job '" in line for w in line.split() if w.startswith("'raysubmit"))
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the SDK client authenticates with the same token
    assert JobSubmissionClient(job_server).get_job_status(job_id) == JobStatus.SUCCEEDED
    final = tmp_path / "jobrun" / "final"
    assert (final / "model.pt").is_file() and (final / "config.yaml").is_file()
    assert json.loads((final / "summary.json").read_text())["epochs_completed"] == 1
    assert any(p.is_dir() for p in (tmp_path / "jobrun").glob("checkpoint_*"))
