"""Shared fixtures. All Ray tests share ONE local Ray for the whole session (``ray_session``):
2 CPUs, the dashboard (which hosts the job server), started with ``address="local"`` so a
cluster left running on the machine is never joined, and shut down at the end with
``ray.shutdown()`` — never with the CLI that stops every Ray on the machine, other users' too.
Module fixtures take it under the name of the resources they need (``ray_start_2_cpus``)."""
import os
import socket
from types import SimpleNamespace

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """The session's Ray: ``.ray`` (the module) and ``.dashboard`` (the job server's URL)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_port=port, namespace="cpal-ray",
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield SimpleNamespace(ray=ray, dashboard=f"http://127.0.0.1:{port}")
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_start_2_cpus(ray_session):
    return ray_session.ray


@pytest.fixture(autouse=True, scope="session")
def _repo_cwd():
    """Tests read configs/… relative to the repository root."""
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)
