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

    from cpal_ray.distributed.stage_runner import ActorResources

    def no_peeking():
        raise AssertionError("pipelines must not size pools from the resources present at start")

    monkeypatch.setattr(ray, "cluster_resources", no_peeking)
    cpu = ActorResources.of(load_config(None).inference).ray_options()
    assert {k: v for k, v in cpu.items() if k != "compute"} == {"num_cpus": 1.0}  # no GPU unless asked
    gpu = load_config(None, ["inference.actor_gpus=0.25", "inference.actor_cpus=2"])
    assert {k: v for k, v in ActorResources.of(gpu.inference).ray_options().items() if k != "compute"} == \
        {"num_cpus": 2.0, "num_gpus": 0.25}
    grow = ActorResources(1.0, max_actors=0).ray_options()["compute"]
    assert (grow.min_size, grow.max_size) == (1, float("inf"))  # grows as the autoscaler adds nodes
    capped = ActorResources(1.0, max_actors=3).ray_options()["compute"]
    assert (capped.min_size, capped.max_size) == (1, 3)
    for section in ("inference", "pseudo", "affinity", "seg"):  # one shape in every stage section
        assert ActorResources.of(getattr(gpu, section)).cpus > 0


def test_old_actor_resource_names_still_load(caplog):
    """A config written before the one shape loads, each old name read as its new one, with a warning
    given once per process (an older run's saved config is read by every resume and worker)."""
    import cpal_ray.config.loading as config_module

    config_module._RENAMES_TOLD.clear()
    old = load_config(None, ["inference.use_gpu=true", "inference.cam_actors_per_gpu=4", "inference.cam_cpus=2",
                             "inference.max_cam_actors=3", "pseudo.cpus_per_task=0.25", "pseudo.max_crf_actors=2",
                             "affinity.cpus_per_task=0.5", "seg.cpus_per_task=0.5"])
    assert (old.inference.actor_gpus, old.inference.actor_cpus, old.inference.max_actors) == (0.25, 2.0, 3)
    assert (old.pseudo.actor_cpus, old.pseudo.max_actors, old.pseudo.actor_gpus) == (0.25, 2, 0.0)
    assert (old.affinity.actor_cpus, old.affinity.actor_gpus, old.seg.actor_cpus, old.seg.actor_gpus) == \
        (0.5, 0.25, 0.5, 0.25)
    assert "pseudo.max_crf_actors is now pseudo.max_actors" in caplog.text
    caplog.clear()
    load_config(None, ["pseudo.max_crf_actors=2", "seg.cpus_per_task=0.5"])
    assert "is now" not in caplog.text  # told once
    assert load_config(None, ["inference.use_gpu=false"]).seg.actor_gpus == 0.0


def test_workflow_flags_become_config_overrides():
    from workflows import make_cams, pseudo_labels
    from workflows.common import cam_actor_overrides

    args = make_cams.build_parser().parse_args(["--checkpoint", "c", "--gpu", "--actors-per-gpu", "2",
                                                "--cam-actors", "8", "--cam-cpus", "0.5"])
    cfg = load_config(None, cam_actor_overrides(args))
    assert (cfg.inference.actor_gpus, cfg.inference.max_actors, cfg.inference.actor_cpus) == (0.5, 8, 0.5)
    off = make_cams.build_parser().parse_args(["--checkpoint", "c", "--no-gpu"])
    assert load_config("configs/voc_resnet50_8gpu.yaml", cam_actor_overrides(off)).inference.actor_gpus == 0
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

    from cpal_ray.distributed import stages

    cfg = load_config("configs/synthetic_tiny.yaml", ["data.synthetic_images=4"])
    moved = []

    class Model:
        def to(self, device):
            moved.append(torch.device(device))
            return self

    monkeypatch.setattr(stages, "load_trained", lambda *a, **k: (Model(), SimpleNamespace(
        train=SimpleNamespace(task=k.get("task", "affinity"))), None))
    stages.CamPredictor("ckpt", cfg, "out", split="train", source="cam")
    stages.MaskMaker("ckpt", cfg, "out", "cams", split="train")
    assert stages.PseudoLabeler(cfg, "out", "cams", split="train").device == torch.device("cpu")
    assert moved == [torch.device("cpu")] * 2
    gpu_node.append(0)
    stages.CamPredictor("ckpt", cfg, "out", split="train", source="cam")
    assert moved[-1] == torch.device("cuda")
