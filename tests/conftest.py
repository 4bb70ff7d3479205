"""Shared fixtures. Ray tests get one local Ray per test module (``ray_start_2_cpus``), started
with ``address="local"`` and shut down by the fixture with ``ray.shutdown()``, never by the
CLI that stops every Ray on the machine, including other users' ones."""
import os

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ray_start_2_cpus():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="cpal-ray",
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _repo_cwd():
    """Tests read configs/… relative to the repository root."""
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)
