"""How workflows connect to Ray and size their actor pools, decided without a cluster at hand:
Ray's rule for joining a running cluster, relative outputs refused inside a job, and CAM/CRF
actor resources that come from the config, never from what the cluster holds at the start."""
from types import SimpleNamespace

import pytest

from cpal_ray.config import ConfigError, load_config

pytestmark = pytest.mark.unit


@pytest.fixture
def fake_ray(monkeypatch):
    """Records ray.init calls instead of starting Ray."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_workflow_joins_the_running_cluster_unless_told_otherwise(fake_ray, monkeypatch):
    from cpal_ray.distributed.runtime import init_ray

    init_ray()  # on a head node: Ray's own discovery (a running cluster, else a new local Ray)
    assert "address" not in fake_ray[-1]
    init_ray(num_cpus=2)  # resources can only be given to a private Ray
    assert fake_ray[-1]["address"] == "local" and fake_ray[-1]["num_cpus"] == 2
    init_ray("local")
    assert fake_ray[-1]["address"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # set by `ray job submit`
    init_ray()
    assert fake_ray[-1]["address"] == "10.0.0.1:6379"


def test_relative_output_inside_a_job_with_a_working_dir_is_refused(monkeypatch, tmp_path):
    import ray

    from cpal_ray.distributed.runtime import output_location

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(runtime_env={"working_dir": "gcs://_ray_pkg_abc.zip"}))
    with pytest.raises(ConfigError, match="train.storage_path='results' is a relative path"):
        output_location("results", "train.storage_path")
    assert str(output_location(str(tmp_path), "x")) == str(tmp_path)
    assert str(output_location("s3://bucket/runs", "x")) == "s3://bucket/runs"
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env={}))
    assert output_location("results", "x").local_path.is_absolute()  # outside a job: the working directory


def test_cam_and_crf_pools_take_resources_from_the_config(monkeypatch):
    import ray

    from cpal_ray.distributed import pipelines

    def no_peeking():
        raise AssertionError("pipelines must not size pools from the resources present at start")

    monkeypatch.setattr(ray, "cluster_resources", no_peeking)
    cpu = load_config(None).inference
    assert pipelines.cam_actor_resources(cpu) == {"num_cpus": 1.0}  # no GPU unless asked, whatever the cluster has
    gpu = load_config(None, ["inference.use_gpu=true", "inference.cam_actors_per_gpu=4", "inference.cam_cpus=2"])
    assert pipelines.cam_actor_resources(gpu.inference) == {"num_cpus": 2.0, "num_gpus": 0.25}
    grow = pipelines.elastic_pool(0)
    assert (grow.min_size, grow.max_size) == (1, float("inf"))  # grows as the autoscaler adds nodes
    capped = pipelines.elastic_pool(3)
    assert (capped.min_size, capped.max_size) == (1, 3)


def test_workflow_flags_become_config_overrides():
    from workflows import make_cams, pseudo_labels
    from workflows.common import cam_actor_overrides

    args = make_cams.build_parser().parse_args(["--checkpoint", "c", "--gpu", "--actors-per-gpu", "2",
                                                "--cam-actors", "8", "--cam-cpus", "0.5"])
    cfg = load_config(None, cam_actor_overrides(args))
    assert (cfg.inference.use_gpu, cfg.inference.cam_actors_per_gpu, cfg.inference.max_cam_actors,
            cfg.inference.cam_cpus) == (True, 2, 8, 0.5)
    off = make_cams.build_parser().parse_args(["--checkpoint", "c", "--no-gpu"])
    assert load_config("configs/voc_resnet50_8gpu.yaml", cam_actor_overrides(off)).inference.use_gpu is False
    assert pseudo_labels.build_parser().parse_args(["--cams", "x", "--crf-actors", "4"]).crf_actors == 4


def test_segmenter_and_sweep_flags_set_their_config_fields_and_leave_the_rest():
    import argparse

    from workflows.common import add_seg_flags, base_parser, parse_command, seg_overrides

    p = base_parser("x")
    add_seg_flags(p)
    args = parse_command(p, ["--scales", "1.0", "0.5", "--crf", "seg.epochs=2"], seg_overrides)
    cfg = load_config(None, args.overrides)
    assert (cfg.seg.scales, cfg.seg.crf, cfg.seg.flip, cfg.seg.epochs) == ((1.0, 0.5), True, False, 2)
    assert load_config(None, parse_command(p, [], seg_overrides).overrides) == load_config(None)  # nothing given
    with pytest.raises(ConfigError, match="seg.scales"):
        load_config(None, parse_command(p, ["--scales", "-1"], seg_overrides).overrides)
    assert isinstance(args, argparse.Namespace) and args.flag_fields["seg.scales"] == "--scales 1.0 0.5"


@pytest.fixture
def gpu_node(monkeypatch):
    """A GPU node as an actor sees it under Ray 2.60: CUDA visible whatever Ray granted."""
    import ray
    import torch

    granted = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: list(granted))
    return granted


def test_actor_device_follows_the_gpus_ray_granted_not_the_visible_ones(gpu_node, monkeypatch):
    import ray
    import torch

    from cpal_ray.distributed.runtime import actor_device

    assert actor_device() == torch.device("cpu")  # asked for no GPU: never cuda, though one is visible
    gpu_node.append(3)  # a (share of a) GPU granted: Ray points CUDA_VISIBLE_DEVICES at it
    assert actor_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # granted, but a CPU build of torch
    with pytest.raises(RuntimeError, match="Ray granted GPU 3 to this actor but torch .* sees no CUDA device"):
        actor_device()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert actor_device() == torch.device("cpu")  # outside Ray


def test_stage_actors_without_a_gpu_keep_their_model_on_the_cpu(gpu_node, monkeypatch):
    """CAM, CRF, mask and prediction actors all take their device from ``actor_device``."""
    import torch

    from cpal_ray.distributed import pipelines, refine_pipelines
    from cpal_ray.engine import checkpoint

    cfg = load_config("configs/synthetic_tiny.yaml", ["data.synthetic_images=4"])
    moved = []

    class Model:
        def to(self, device):
            moved.append(torch.device(device))
            return self

    monkeypatch.setattr(checkpoint, "load_trained", lambda *a, **k: (Model(), SimpleNamespace(
        train=SimpleNamespace(task=k.get("task", "affinity"))), None))
    pipelines.CamPredictor("ckpt", cfg, "out", split="train", source="cam")
    refine_pipelines.MaskMaker("ckpt", cfg, "out", "cams", split="train")
    assert pipelines.PseudoLabeler(cfg, "out", "cams", split="train").device == torch.device("cpu")
    assert moved == [torch.device("cpu")] * 2
    gpu_node.append(0)
    pipelines.CamPredictor("ckpt", cfg, "out", split="train", source="cam")
    assert moved[-1] == torch.device("cuda")
