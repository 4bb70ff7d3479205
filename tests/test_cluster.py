"""The multi-node proof: every workflow submitted with `ray job submit` to a Ray cluster of several
nodes on this machine, scaling from zero, with every output in an S3 bucket (moto).

The cluster (``ray.cluster_utils.Cluster``) is what ``cluster.yaml`` describes, in miniature: a
head with 0 CPUs for work (it runs the job drivers, and actors that need no CPU), and worker
nodes that the tests add and remove while jobs run, as an autoscaler would. Token auth stays on.
Only the processes this module starts are stopped (``Cluster.shutdown``, the moto server).

Run with ``pytest -m cluster`` (``.ci/run`` runs it after the default suite). The commands are
the ones ``docs/cluster.md`` shows, with the synthetic config.
"""
import io
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from cpal_ray.storage import location
from tests.conftest import REPO, free_port, restore_env

pytestmark = pytest.mark.cluster
TINY = "configs/synthetic_tiny.yaml"
SUBMIT_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head (0 CPUs, dashboard/job server) + one worker node; yields helpers. Shut down at the end."""
    import ray
    from ray.cluster_utils import Cluster

    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.fail("the cluster suite needs token auth (RAY_AUTH_MODE=token, set by conftest before Ray is imported)")
    subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"], check=True,
                   capture_output=True)  # ~/.ray/auth_token, unless there is one already
    saved = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")}
    # Worker processes on a node new to a job first unpack its working_dir: on 2 busy cores that
    # can take longer than Ray Train's default 60 s wait for a worker group.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "600"
    port = free_port()
    # Every node's dashboard agent on a port of its own: the default (52365) may be taken by another
    # Ray on this machine, and a head without its agent answers every job submission with "No
    # available agent to submit job".
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_port": port, "dashboard_host": "127.0.0.1",
        "dashboard_agent_listen_port": free_port()})
    try:
        workers = [add_worker_node(c)]
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="cpal-ray-cluster-test")  # the tests' own view of the cluster
        yield SimpleNamespace(cluster=c, workers=workers, dashboard=f"http://127.0.0.1:{port}",
                              bucket=s3_server.bucket("cpal-cluster"))
    finally:
        ray.shutdown()
        c.shutdown()
        restore_env(saved)


_nodes_added = itertools.count()


def add_worker_node(c, wait: bool = True):
    """A worker node with 1 CPU and its own runtime-env folder, as on a machine of its own.

    Nodes on one machine share the session folder, and Ray's working_dir plugin re-extracts the
    job's package into ``<session>/runtime_resources/working_dir_files`` (deleting it first) each
    time a node's agent sets the job up: a node joining mid-job would delete the working directory
    of every process already running from it on the other nodes (their ``os.getcwd()`` fails, a
    lazy import can miss its file). Separate machines have separate folders; so does each node here."""
    return c.add_node(wait=wait, num_cpus=1, runtime_env_dir_name=f"runtime_resources_node{next(_nodes_added)}",
                      dashboard_agent_listen_port=free_port())


def kill_node(cluster, node) -> None:
    """A node lost as a spot interruption or the OOM killer loses it: its raylet dies by SIGKILL, with
    no chance to tell the GCS, which finds out by its health checks (the crash-detection path); the
    node's other processes are then killed the same way. ``Cluster.remove_node`` alone stops a node
    gracefully (SIGTERM first), which a real crash never does."""
    import signal

    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    os.kill(raylet.pid, signal.SIGKILL)
    raylet.wait(timeout=60)
    deadline = time.monotonic() + 300
    while node.node_id in cluster.cluster.global_state._live_node_ids():  # until the GCS's health checks fail
        assert time.monotonic() < deadline, f"the GCS still lists node {node.node_id} as alive"
        time.sleep(0.5)
    cluster.cluster.remove_node(node, allow_graceful=False)  # the rest of the node, SIGKILL too
    cluster.workers.remove(node)


def node_of_actor(name: str) -> str:
    """The Ray node id of the live actor called ``name`` (any namespace)."""
    from ray.util.state import list_actors

    alive = [a for a in list_actors(filters=[("name", "=", name), ("state", "=", "ALIVE")], detail=True)]
    assert len(alive) == 1, alive
    return alive[0].node_id


def scale_to(cluster, n: int) -> None:
    """Add or remove worker nodes (1 CPU each) until there are ``n``, as an autoscaler would."""
    while len(cluster.workers) < n:
        cluster.workers.append(add_worker_node(cluster.cluster, wait=False))
    while len(cluster.workers) > n:
        cluster.cluster.remove_node(cluster.workers.pop())
    cluster.cluster.wait_for_nodes()


def submit(cluster, *args: str) -> str:
    """``ray job submit --no-wait`` of ``python -m <args>`` (the repository as working dir); the job id."""
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait", "--address", cluster.dashboard,
           "--working-dir", REPO, "--", sys.executable, "-m", *args]
    deadline = time.monotonic() + 300  # a busy machine: the agent can take minutes
    while True:  # right after a start the head's job agent may not be up yet
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        if proc.returncode == 0 or "No available agent" not in out or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert proc.returncode == 0, out[-3000:]
    return next(w.strip("'") for line in out.splitlines() if "Job '" in line for w in line.split()
                if w.startswith("'raysubmit"))


def client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard)  # sends the token (RAY_AUTH_MODE=token, see above)


def wait_job(cluster, job_id: str, until=None, timeout_s: float = SUBMIT_TIMEOUT_S) -> str:
    """Wait for the job to end (or for ``until()`` to be true while it runs); returns its status."""
    from ray.job_submission import JobStatus

    jobs, deadline = client(cluster), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = jobs.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        if until is not None and until():
            return status
        time.sleep(0.3)
    pytest.fail(f"job {job_id} still {jobs.get_job_status(job_id)} after {timeout_s}s:\n"
                f"{jobs.get_job_logs(job_id)[-4000:]}")


def succeeded(cluster, job_id: str, until=None) -> str:
    from ray.job_submission import JobStatus

    status = wait_job(cluster, job_id, until)
    logs = client(cluster).get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    return logs


def last_json(logs: str) -> dict:
    return json.loads(next(line for line in reversed(logs.splitlines()) if line.startswith("{")))


def train_args(bucket: str, name: str, *extra: str) -> list[str]:
    return ["workflows.train", "--config", TINY, f"train.storage_path={bucket}/runs", f"train.name={name}",
            "dist.num_workers=2", "dist.cpus_per_worker=1", "train.log_every=1000", "cpal.warmup_cluster_steps=0",
            *extra]


def expected_keys(epochs: int, steps: int, ranks: int = 2) -> set[str]:
    return {f"{e}-{s}-{r}" for e in range(epochs) for s in range(steps) for r in range(ranks)}


def read_history(final) -> list[dict]:
    """The final attempt's record of each epoch (a restarted run reports some epochs twice)."""
    rows = json.loads((final / "history.json").read_text())
    return list({int(r["epoch"]): r for r in rows}.values())


# ------------------------------------------------------------------------------------ training


def test_train_two_workers_on_two_nodes_share_one_bank(cluster):
    from cpal_ray.engine import load_checkpoint

    scale_to(cluster, 2)
    logs = succeeded(cluster, submit(cluster, *train_args(cluster.bucket, "two-nodes", "train.epochs=2",
                                                          "data.synthetic_images=32")))
    final = location(last_json(logs)["final"])
    assert str(final) == f"{cluster.bucket}/runs/two-nodes/final"  # the exported run, in the bucket
    history = read_history(final)
    worker_nodes = {n.node_id for n in cluster.workers}
    for record in history:
        assert len(set(record["node_ids"])) == 2 and set(record["node_ids"]) <= worker_nodes  # one rank per node
        assert len(set(record["context_versions"])) == 1  # every rank used the same clustering
    state = load_checkpoint(final)
    assert set(state["bank"]["keys"]) == expected_keys(2, 4)  # both nodes' pushes reached the one bank
    checkpoints = [d.name for d in (location(cluster.bucket) / "runs" / "two-nodes").dirs()]
    assert sum(n.startswith("checkpoint_") for n in checkpoints) == 2 and "final" in checkpoints


def test_killed_worker_node_resumes_from_the_checkpoint_in_the_bucket(cluster):
    """A whole node (raylet and its workers) dies mid-epoch; the autoscaler brings a new one; the
    run resumes from the last checkpoint in the bucket with the bank restored, no key twice."""
    from cpal_ray.engine import load_checkpoint

    scale_to(cluster, 2)
    epochs, steps = 4, 40
    run = location(cluster.bucket) / "runs" / "node-kill"
    job = submit(cluster, *train_args(cluster.bucket, "node-kill", f"train.epochs={epochs}", "dist.max_failures=3",
                                      f"data.synthetic_images={8 * steps}"))
    from ray.job_submission import JobStatus

    snapshot = run / "checkpoint_manager_snapshot.json"  # the checkpoints Ray Train has registered

    def registered() -> int:
        return len(json.loads(snapshot.read_text())["checkpoint_results"]) if snapshot.is_file() else 0

    status = wait_job(cluster, job, until=lambda: registered() >= 1)
    assert status == JobStatus.RUNNING, "the run ended before a node could be killed"
    saved = registered()
    # A training run's bank (0 CPU) lives on the head, with the job's driver: no worker loss takes it.
    assert node_of_actor("cpal-bank-node-kill") == cluster.cluster.head_node.node_id
    killed = cluster.workers[-1].node_id
    kill_node(cluster, cluster.workers[-1])   # the node and every process on it are gone, by SIGKILL
    scale_to(cluster, 2)   # the autoscaler's replacement
    logs = succeeded(cluster, job)
    final = location(last_json(logs)["final"])
    history = read_history(final)
    assert [r["epoch"] for r in history] == list(range(epochs))
    resumed = [r for r in history if r["start_epoch"] > 0]
    # The resume step: the attempt after the kill started from a registered checkpoint (>= the
    # ones registered before the kill), not from scratch, on nodes other than the killed one.
    assert resumed and resumed[0]["start_epoch"] >= saved, (saved, history)
    assert all(killed not in r["node_ids"] for r in resumed), history
    state = load_checkpoint(final)
    assert set(state["bank"]["keys"]) == expected_keys(epochs, steps)
    pushed = [0] * state["config"].data.num_classes
    for record in history:
        for per_rank in record["pushed_per_rank"]:
            for c, n in per_rank.items():
                pushed[int(c)] += n
    assert state["bank"]["pushed"].tolist() == pushed  # no prototype stored twice
    print(f"\nnode {killed[:8]} killed; resumed at epoch {resumed[0]['start_epoch']} from the bucket's checkpoint")


# -------------------------------------------------------------------------------------- sweeps


def test_sweep_trials_run_at_once_then_restore_after_stop(cluster):
    scale_to(cluster, 2)
    exp = location(cluster.bucket) / "sweeps" / "cluster-sweep"
    fast = ["train.epochs=1", "train.max_steps_per_epoch=2", "dist.num_workers=1", "dist.cpus_per_worker=0.5",
            "data.synthetic_images=16", "inference.scales=[1.0]", "train.log_every=1000"]
    args = ["workflows.sweep", "--space", "tune_spaces.table3", "--config", TINY, "--storage",
            f"{cluster.bucket}/sweeps", "--name", "cluster-sweep", "--max-concurrent", "2", "--eval-max-images", "8",
            *fast]
    job = submit(cluster, *args)

    def finished():
        trials = exp / "trials"
        return sum((t / "seeds.json").is_file() for t in trials.dirs()) >= 2

    from ray.job_submission import JobStatus

    assert wait_job(cluster, job, until=finished) == JobStatus.RUNNING
    client(cluster).stop_job(job)  # interrupted: 2 of the 4 trials are done
    assert wait_job(cluster, job) == JobStatus.STOPPED
    done = {t.name: (t / "seeds.json").read_text() for t in (exp / "trials").dirs() if (t / "seeds.json").is_file()}
    spans = [(s["started_at"], s["finished_at"]) for s in map(json.loads, done.values())]
    assert len(spans) >= 2 and max(a for a, _ in spans[:2]) < min(b for _, b in spans[:2]), spans  # at once

    logs = succeeded(cluster, submit(cluster, "workflows.sweep", "--restore", str(exp)))
    assert last_json(logs)["ok"] == 4
    for t in (exp / "trials").dirs():
        runs = (t / "runs.log").read_text()
        if t.name in done:  # finished before the stop: not trained again, its evaluation stands
            assert runs.count("start") == 1 and (t / "seeds.json").read_text() == done[t.name], (t.name, runs)
        else:  # stopped while running or never started: trained by the restore
            assert runs.count("start") >= 1 and (t / "seeds.json").is_file(), (t.name, runs)
    rows = pd.read_csv(io.BytesIO((exp / "results.csv").read_bytes()))
    assert rows["seeds_ok"].sum() == 4 and (exp / "best_config.yaml").is_file() and (exp / "bars.png").size() > 0


def test_killed_node_of_a_trial_driver_and_its_bank_retries_the_trial_from_its_checkpoint(cluster):
    """A sweep trial's driver and its bank actor cannot sit on the 0-CPU head: they run on a worker
    node (a spot GPU node in the worst case). That node dies by SIGKILL mid-training: Tune retries
    the trial, whose Ray Train run resumes from the trial's last checkpoint, bank included."""
    from cpal_ray.engine import load_checkpoint

    scale_to(cluster, 2)
    epochs, steps = 3, 30
    exp = location(cluster.bucket) / "sweeps" / "trial-node-kill"
    args = ["workflows.sweep", "--space", "tune_spaces.k_tau", "--config", TINY, "--storage",
            f"{cluster.bucket}/sweeps", "--name", "trial-node-kill", "--max-concurrent", "1", "--eval-max-images", "8",
            "--search", "random", "--num-samples", "1", f"train.epochs={epochs}", f"data.synthetic_images={8 * steps}",
            f"train.max_steps_per_epoch={steps}", "dist.num_workers=1", "dist.cpus_per_worker=0.5",
            "inference.scales=[1.0]", "train.log_every=1000", "cpal.warmup_cluster_steps=0"]
    job = submit(cluster, *args)
    from ray.job_submission import JobStatus

    def first_trial_checkpointed():
        trials = [t for t in (exp / "trials").dirs()] if (exp / "trials").is_dir() else []
        for t in trials:
            snapshot = t / "checkpoint_manager_snapshot.json"
            if snapshot.is_file() and json.loads(snapshot.read_text())["checkpoint_results"]:
                return t
        return None

    assert wait_job(cluster, job, until=lambda: first_trial_checkpointed() is not None) == JobStatus.RUNNING
    trial = first_trial_checkpointed()
    bank_node = node_of_actor(f"cpal-bank-{trial.name}")
    assert bank_node != cluster.cluster.head_node.node_id  # with the trial's driver, on a worker node
    node = next(n for n in cluster.workers if n.node_id == bank_node)
    kill_node(cluster, node)
    scale_to(cluster, 2)
    logs = succeeded(cluster, job)
    assert last_json(logs)["error"] == 0 and last_json(logs)["ok"] >= 1, logs[-3000:]
    assert (trial / "runs.log").read_text().count("start") == 2  # the retry, not a new trial
    # The retry is a new fit of the same run: its history holds the epochs it trained, from where it resumed.
    history = read_history(trial / "final")
    resumed_at = history[0]["start_epoch"]
    assert resumed_at >= 1 and [r["epoch"] for r in history] == list(range(resumed_at, epochs)), history
    state = load_checkpoint(trial / "final")
    assert set(state["bank"]["keys"]) == expected_keys(epochs, steps, ranks=1)  # the bank came back whole


# ------------------------------------------------------------------------------------ Ray Data


@pytest.fixture(scope="module")
def trained_run(cluster):
    """A CPAL checkpoint in the bucket (1 epoch, 1 worker) for the inference pipelines."""
    scale_to(cluster, 2)
    logs = succeeded(cluster, submit(cluster, "workflows.train", "--config", TINY, f"train.storage_path={cluster.bucket}/runs",
                                     "train.name=for-cams", "train.epochs=1", "dist.num_workers=1",
                                     "dist.cpus_per_worker=1", "train.log_every=1000"))
    return location(last_json(logs)["final"])


def pool_actors(prefix: str) -> list:
    """The Ray Data actors of a stage whose class starts with ``prefix`` (alive or finished)."""
    from ray.util.state import list_actors

    return [a for a in list_actors(limit=10_000, detail=True) if prefix in (a.class_name or "")]


def single_node_run(tmp_path, *args: str) -> Path:
    """The same workflow on a private one-node Ray in a subprocess (the reference bytes)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", *args, "--address", "local", "--num-cpus", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path


def assert_same_files(bucket_dir, local_dir: Path, suffix: str) -> int:
    names = sorted(p.name for p in local_dir.glob(f"*{suffix}"))
    assert names and [p.name for p in bucket_dir.list(suffix)] == names
    for name in names:
        assert (bucket_dir / name).read_bytes() == (local_dir / name).read_bytes(), name
    return len(names)


def test_make_cams_and_pseudo_labels_pools_grow_with_the_cluster(cluster, trained_run, tmp_path):
    scale_to(cluster, 1)
    # Enough images that the job outlives the nodes' arrival: with 128 one run finished its CAMs
    # (milliseconds each) before Ray Data saw the new nodes. Nodes join after the first file, not
    # earlier: nodes started while the driver still imports (a one-machine cluster shares one
    # runtime-env folder) removed files of its working_dir.
    n = 256
    data = [f"data.synthetic_images={n}", "data.synthetic_size=160", "inference.scales=[1.0,0.5]"]
    cams = location(cluster.bucket) / "cams" / "train"
    job = submit(cluster, "workflows.make_cams", "--checkpoint", str(trained_run), "--split", "train", "--source",
                 "both", "--out", str(cams), "--no-gpu", "--cam-cpus", "1", *data)
    wait_job(cluster, job, until=lambda: len(cams.list(".npz")) >= 1)
    first = cluster.workers[0].node_id
    scale_to(cluster, 3)  # nodes arrive while the job runs
    summary = last_json(succeeded(cluster, job))
    assert summary["done"] == n and summary["failed"] == 0
    actors = [a for a in pool_actors("CamPredictor") if a.job_id == client(cluster).get_job_info(job).driver_info.id]
    nodes = {a.node_id for a in actors}
    assert len(actors) > 1 and len(nodes) > 1 and nodes - {first}, [(a.class_name, a.node_id) for a in actors]
    manifest = pq.read_table(io.BytesIO((cams / "manifest.parquet").read_bytes()))
    assert manifest.num_rows == n and set(manifest.column("status").to_pylist()) == {"done"}

    labels = location(cluster.bucket) / "pseudo" / "train"
    scale_to(cluster, 1)
    job = submit(cluster, "workflows.pseudo_labels", "--cams", str(cams), "--split", "train", "--out", str(labels),
                 "--cpus-per-crf", "1", *data)
    wait_job(cluster, job, until=lambda: len(labels.list(".png")) >= 1)
    scale_to(cluster, 3)
    report = last_json(succeeded(cluster, job))
    assert report["run"]["done"] == n and report["miou"]["images"] == n
    crf = [a for a in pool_actors("PseudoLabeler") if a.job_id == client(cluster).get_job_info(job).driver_info.id]
    assert len(crf) > 1 and len({a.node_id for a in crf}) > 1
    assert (labels / "pseudo_labels_miou.json").is_file() and (labels / "manifest.parquet").is_file()

    # The same runs on one node give the same bytes.
    local_cams = single_node_run(tmp_path / "cams", "workflows.make_cams", "--checkpoint", str(trained_run), "--split",
                                 "train", "--source", "both", "--out", str(tmp_path / "cams"), "--cam-cpus", "1", *data)
    local_labels = single_node_run(tmp_path / "labels", "workflows.pseudo_labels", "--cams", str(tmp_path / "cams"),
                                   "--split", "train", "--out", str(tmp_path / "labels"), "--no-eval", *data)
    files = assert_same_files(cams, local_cams, ".npz") + assert_same_files(cams / "pacam", local_cams / "pacam", ".npz")
    files += assert_same_files(labels, local_labels, ".png")
    print(f"\n{files} files byte-identical to a one-node run; CAM actors on "
          f"{len({a.node_id for a in actors})} nodes ({len(actors)} actors), CRF actors on "
          f"{len({a.node_id for a in crf})} nodes ({len(crf)} actors)")


# ------------------------------------------------------------------------------- the refine half


def test_the_whole_pipeline_as_one_job_with_every_output_in_the_bucket(cluster):
    """workflows.pipeline under ray job submit on two worker nodes: the CAM run, CRF seeds, the
    affinity run, masks, the segmenter and its val predictions, all in S3; scored at each stage."""
    scale_to(cluster, 2)
    out = location(cluster.bucket) / "pipeline"
    job = submit(cluster, "workflows.pipeline", "--config", TINY, "--out", str(out), "train.name=pipe",
                 "data.synthetic_images=8", "train.epochs=1", "cpal.warmup_cluster_steps=0", "dist.num_workers=2",
                 "dist.cpus_per_worker=1", "train.log_every=1000", "inference.scales=[1.0]", "pseudo.actor_cpus=1",
                 "affinity.epochs=1", "affinity.batch_size=4", "affinity.crop_size=64", "affinity.exp_times=3",
                 "seg.epochs=1", "seg.batch_size=4", "seg.crop_size=64")
    logs = succeeded(cluster, job)
    summary = json.loads((out / "pipeline.json").read_text())
    assert set(summary["scores"]) == {"seeds", "crf", "masks", "seg_val"}, logs[-3000:]
    for folder in ("masks-train", "seg-val"):
        rows = pq.read_table(io.BytesIO((out / folder / "manifest.parquet").read_bytes())).to_pylist()
        assert len(rows) == 8 and {r["status"] for r in rows} == {"done"}
    for run in ("pipe", "pipe-affinity", "pipe-seg"):
        assert (out / "runs" / run / "final" / "model.pt").is_file(), run
    assert "task: seg" in (out / "runs" / "pipe-seg" / "final" / "config.yaml").read_text()
