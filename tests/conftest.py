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
# Token auth on for every Ray the tests start or join (Ray reads the mode when first imported; a
# local ray.init() turns it on by default, a ray.cluster_utils.Cluster only when asked).
os.environ.setdefault("RAY_AUTH_MODE", "token")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def restore_env(saved: dict) -> None:
    """Put back environment variables saved as {name: value or None (was unset)}."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
    """Tests read files (assets, docs) relative to the repository root."""
    old = os.getcwd()
    os.chdir(REPO)
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-compatible server (moto's standalone mode) started for this session and stopped
    at its end. Sets the AWS variables (fake credentials, ``AWS_ENDPOINT_URL``) for this process
    and the processes it starts; yields ``.endpoint`` and ``.bucket(name)`` (creates a bucket)."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {endpoint}")
                time.sleep(0.2)

        def bucket(name: str) -> str:
            import pyarrow.fs as pafs

            pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(name)
            return f"s3://{name}"

        yield SimpleNamespace(endpoint=endpoint, bucket=bucket)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        restore_env(saved)
