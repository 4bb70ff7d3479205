"""cluster.yaml: valid for Ray's own cluster launcher, and consistent with what the workflows need.

Validation is offline: Ray's ``prepare_config`` (merge with the AWS provider defaults) and
``validate_config`` (jsonschema against ``ray/autoscaler/ray-schema.json`` plus Ray's own
cross-field checks), the same two steps ``ray up`` runs before it talks to AWS.
"""
import ast
import copy
import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cpal_ray.config import load_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
# The CUDA major each faiss GPU distribution the `gpu` extra may pin links, read from the wheels'
# Requires-Dist (docs/install.md, "Why this pair"): faiss-gpu 1.15.1 needs nvidia-*-cu12 >= 12.6.
FAISS_CUDA_MAJOR = {"faiss-gpu==1.15.1": 12}
GPU_CONFIGS = ["configs/voc_resnet50_8gpu.yaml", "configs/coco_resnet50_8gpu.yaml"]
# GPUs per instance of the AWS types a worker may use for the paper's 8-GPU setting.
EIGHT_GPU_TYPES = {"g5.48xlarge": 8, "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8}
SECRET_PATTERNS = [
    r"aws_secret_access_key",
    r"aws_access_key_id",
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    r"(?<!get-login-)password(?!-stdin)",  # not `aws ecr get-login-password | docker login --password-stdin`
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"ssh_private_key",
    r"RAY_AUTH_TOKEN\s*[=:]",
]


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_validate(config: dict) -> dict:
    """What ``ray up`` does before contacting the cloud: fill defaults, then validate."""
    jsonschema.validate(config, ray_schema())
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


def gpu_worker_types(config: dict) -> dict:
    return {k: v for k, v in worker_types(config).items() if v["resources"].get("GPU", 0) > 0}


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments left out."""
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.MULTILINE)
    return [line.strip() for line in text.replace("\\\n", "").splitlines() if line.strip()]


def dockerfile_base_image() -> str:
    lines = dockerfile_lines()
    default = {m.group(1): m.group(2) for line in lines if (m := re.fullmatch(r"ARG (\w+)=(\S+)", line))}
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    return re.sub(r"\$\{(\w+)\}", lambda m: default[m.group(1)], base)


def secrets_in(text: str) -> list[str]:
    return [p for p in SECRET_PATTERNS if re.search(p, text, flags=re.IGNORECASE)]


def all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k, [])]


def test_cluster_yaml_passes_ray_schema_and_validate_config():
    prepared = ray_validate(load_cluster())
    assert prepared["provider"]["type"] == "aws"
    # prepare_config merged setup_commands into both node roles.
    assert any("pip install --no-deps" in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize("corrupt", [
    pytest.param(lambda c: c.update(max_worker=2), id="misspelled-top-level-key"),
    pytest.param(lambda c: c["docker"].update(imagename="x"), id="unknown-docker-key"),
    pytest.param(lambda c: worker_types(c)["gpu_8x"]["resources"].update(GPU="8"), id="gpu-count-as-string"),
    pytest.param(lambda c: worker_types(c)["gpu_8x"]["resources"].update(GPU=-1), id="negative-gpus"),
    pytest.param(lambda c: worker_types(c)["gpu_8x"].pop("node_config"), id="node-type-without-node_config"),
    pytest.param(lambda c: c.update(head_node_type="missing"), id="head-type-not-defined"),
    pytest.param(lambda c: worker_types(c)["gpu_8x"].update(min_workers=c["max_workers"] + 1),
                 id="min-workers-above-global-max"),
    pytest.param(lambda c: c.update(setup_commands="pip install -e ."), id="commands-not-a-list"),
])
def test_corrupted_copies_fail_validation(corrupt):
    config = load_cluster()
    corrupt(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_node_image_is_built_on_rays_gpu_image_for_installed_ray_and_py311():
    image = dockerfile_base_image()
    # An explicit CUDA platform: the "-gpu" alias follows whichever CUDA build Ray chose.
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py311-(cu\d+)", image)
    assert m, f"{image!r} is not an official rayproject/ray py311 image with an explicit -cuXY platform"
    major, minor = ray.__version__.split(".")[:2]
    assert (m.group(1), m.group(2)) == (major, minor) == ("2", "60"), \
        f"image {image} does not match ray {ray.__version__} pinned by pyproject (2.60.*)"
    # The cluster runs the project's image (pushed to the account's registry), not Ray's bare one.
    assert re.fullmatch(r"[\w-]+\.dkr\.ecr\.[\w-]+\.amazonaws\.com/cpal-ray:[\w.-]+", load_cluster()["docker"]["image"])


def test_head_is_cpu_and_workers_are_8gpu_and_cpu_types():
    config = load_cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = gpu_worker_types(config)
    assert gpu, "no GPU worker node type"
    for name, node in gpu.items():
        itype = node["node_config"]["InstanceType"]
        assert node["resources"]["GPU"] == 8, name
        assert EIGHT_GPU_TYPES.get(itype) == 8, f"{name}: {itype} is not a known 8-GPU instance type"
        assert node["resources"]["CPU"] > 0
    cpu = {k: v for k, v in worker_types(config).items() if k not in gpu}
    assert cpu, "no CPU worker node type: CPU-only stages would start 8-GPU nodes"
    for name, node in cpu.items():
        assert node["resources"]["CPU"] > 0 and not re.match(r"(g|p)\d", node["node_config"]["InstanceType"]), name


def test_autoscaler_starts_cpu_nodes_for_cpu_stages_and_gpu_nodes_for_training():
    """Ray's own bin-packing (the autoscaler's choice of node type) on this file's node types."""
    import functools

    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for

    config = load_cluster()
    scorer = functools.partial(_default_utilization_scorer,
                               node_availability_summary=NodeAvailabilitySummary(node_availabilities={}))

    def nodes_for(demands):
        added, left = get_nodes_for(config["available_node_types"], {}, config["head_node_type"], 10, demands, scorer)
        assert not left, left
        return {k: v for k, v in added.items() if v}

    cpu_type = next(k for k in worker_types(config) if k not in gpu_worker_types(config))
    gpu_type = next(iter(gpu_worker_types(config)))
    cfg = load_config("configs/voc_resnet50_8gpu.yaml")
    assert nodes_for([{"CPU": cfg.pseudo.actor_cpus}] * 16) == {cpu_type: 1}  # CRF actors
    assert nodes_for([{"CPU": 0.01}]) == {cpu_type: 1}  # a sweep trial's driver (and bank) bundle
    workers = [{"CPU": cfg.dist.cpus_per_worker, "GPU": 1}] * cfg.dist.num_workers
    assert nodes_for(workers) == {gpu_type: 1}


def test_every_node_has_an_instance_profile_and_the_head_may_pass_the_workers_role():
    config = load_cluster()
    profiles = {k: v["node_config"].get("IamInstanceProfile", {}).get("Arn", "")
                for k, v in config["available_node_types"].items()}
    for name, arn in profiles.items():
        assert re.fullmatch(r"arn:aws:iam::(\d{12}|ACCOUNT-ID-REPLACE-ME):instance-profile/[\w+=,.@-]+", arn), \
            f"{name}: no IamInstanceProfile (Ray gives its default profile to the head only)"
    head = profiles.pop(config["head_node_type"])
    assert len(set(profiles.values())) == 1 and head not in profiles.values(), profiles
    worker_profile = next(iter(profiles.values())).rsplit("/", 1)[1]
    guide = (REPO / "docs" / "cluster.md").read_text()
    for needed in ("iam:PassRole", f"role/{worker_profile}", "s3:PutObject", "s3:DeleteObject",
                   "AmazonEC2ContainerRegistryReadOnly"):
        assert needed in guide, f"docs/cluster.md does not set up {needed}"


@pytest.mark.parametrize("cfg_path", GPU_CONFIGS)
def test_one_worker_node_fits_the_8gpu_configs(cfg_path):
    cfg = load_config(cfg_path)
    for name, node in gpu_worker_types(load_cluster()).items():
        res = node["resources"]
        assert cfg.dist.num_workers * 1 <= res["GPU"], (cfg_path, name)
        assert cfg.dist.num_workers * cfg.dist.cpus_per_worker <= res["CPU"], (cfg_path, name)


def test_autoscaling_bounds():
    config = load_cluster()
    assert 1 <= config["max_workers"] <= 8
    assert 0 < config["idle_timeout_minutes"] <= 60
    for name, node in worker_types(config).items():
        assert node.get("min_workers", 0) == 0, f"{name} should scale to zero"
        assert 1 <= node.get("max_workers", config["max_workers"]) <= config["max_workers"], name


def test_image_holds_the_dependencies_and_node_setup_downloads_nothing():
    config = load_cluster()
    lines = dockerfile_lines()
    remote_dirs = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert remote_dirs, "the repository is not in file_mounts"
    assert ".gitignore" in config.get("rsync_filter", []), "the .venv and results would be synced"
    # Ray runs its containers with `docker run --rm`: a pip install in setup_commands would run
    # again at every node start. Only the checkout, without dependencies or build isolation.
    pips = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands") for c in config[k]
            if "pip install" in c]
    assert pips and all("--no-deps" in c and "--no-build-isolation" in c for c in pips), pips
    assert any(f"cd {d}" in c for c in pips for d in remote_dirs), "the checkout is not installed"
    # The image installs what pyproject.toml lists, with the gpu extra alone bringing faiss.
    assert any(line == "COPY pyproject.toml /tmp/cpal-ray/pyproject.toml" for line in lines)
    install = next(line for line in lines if "requirements-cpal-ray.txt" in line and "pip install" in line)
    assert "boto3" in install, "the autoscaler on the head needs boto3"
    commands = all_commands(config) + lines
    assert not [c for c in commands if "faiss-cpu" in c or "uninstall" in c or re.search(r"\[[^]]*\bcpu\b", c)]
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[-2:] == ["*", "!pyproject.toml"], "the build context would carry the whole checkout"


def test_image_requirements_are_the_projects_dependencies_and_gpu_extra(tmp_path):
    """The Dockerfile's own snippet, run on this pyproject.toml."""
    import subprocess
    import sys

    line = next(line for line in dockerfile_lines() if "tomllib" in line)
    code = re.search(r'python -c "(.*?)" >', line).group(1).replace("/tmp/cpal-ray/pyproject.toml",
                                                                    str(REPO / "pyproject.toml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert [r for r in out if r] == project["dependencies"] + project["optional-dependencies"]["gpu"]


def cuda_major(tag: str) -> int:
    """'cu126' -> 12, 'cu130' -> 13, 'cu12' -> 12 (CUDA majors have two digits since CUDA 10)."""
    digits = re.fullmatch(r"cu(\d+)", tag).group(1)
    return int(digits[:2])


def test_one_cuda_major_for_torch_faiss_and_the_image():
    """torch's wheel index, the faiss of the `gpu` extra and the Ray image: one CUDA major."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = dockerfile_lines()
    torch_installs = [i for i, c in enumerate(lines) if re.search(r"pip install .*\btorch==", c)]
    assert len(torch_installs) == 1, "the image must install torch once, from a CUDA wheel index"
    torch_cmd = lines[torch_installs[0]]
    index = re.search(r"--index-url https://download\.pytorch\.org/whl/(cu\d+)\b", torch_cmd)
    assert index, f"torch is not installed from a PyTorch CUDA index: {torch_cmd!r}"
    # The same pins as the project, so the later install of its dependencies keeps this build.
    for pin in (d for d in project["dependencies"] if d.startswith(("torch==", "torchvision=="))):
        assert pin in torch_cmd.split(), f"{pin} missing from {torch_cmd!r}"
    project_install = next(i for i, c in enumerate(lines) if "-r /tmp/requirements-cpal-ray.txt" in c)
    assert torch_installs[0] < project_install, "torch must come first, or pip installs the PyPI (CUDA 13) build"

    gpu_extra = project["optional-dependencies"]["gpu"]
    faiss = [d for d in gpu_extra if d.startswith("faiss")]
    assert len(faiss) == 1 and faiss[0] in FAISS_CUDA_MAJOR, \
        f"the gpu extra's faiss {faiss} has no checked CUDA major (check its wheel, docs/install.md)"
    image = re.search(r"-(cu\d+)$", dockerfile_base_image())
    assert image, dockerfile_base_image()
    majors = {"torch index": cuda_major(index.group(1)), "gpu extra": FAISS_CUDA_MAJOR[faiss[0]],
              "ray image": cuda_major(image.group(1))}
    assert len(set(majors.values())) == 1, f"CUDA majors differ: {majors}"


def rays_default_amis() -> tuple[str, set[str]]:
    """Ray's `latest_dlami` fallback: its AMI name and per-region ids, read from the installed
    Ray's AWS config module without importing it (that needs boto3)."""
    src = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py").read_text()
    values = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("DEFAULT_AMI_NAME", "DEFAULT_AMI"):
                values[node.targets[0].id] = ast.literal_eval(node.value)
    return values["DEFAULT_AMI_NAME"], set(values["DEFAULT_AMI"].values())


def test_nodes_do_not_fall_back_to_rays_default_dlami():
    name, default_ids = rays_default_amis()
    assert default_ids, "Ray's default AMI table was not found"
    for key, node in load_cluster()["available_node_types"].items():
        ami = node["node_config"].get("ImageId", "")
        # Ray replaces "" and "latest_dlami" (any case) by its default, today: `name`.
        assert ami.lower() not in ("", "latest_dlami"), f"{key} would get Ray's default AMI {name!r}"
        assert ami not in default_ids, f"{key}: {ami} is Ray's default AMI {name!r}"
        assert re.fullmatch(r"ami-([0-9a-f]{8}|[0-9a-f]{17}|REPLACE-ME)", ami), f"{key}: {ami!r}"
    text = CLUSTER_YAML.read_text()
    assert "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id" in text, \
        "cluster.yaml must say where the AMI id comes from"


def test_token_auth_on_every_node():
    config = load_cluster()
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any("--autoscaling-config" in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("cfg_path", GPU_CONFIGS)
def test_storage_and_data_paths_of_gpu_configs_are_on_mounted_volumes(cfg_path):
    config = load_cluster()
    opts = " ".join(config["docker"]["run_options"])
    mounted = [dst for _, dst in re.findall(r"-v\s+(\S+):(\S+)", opts)]
    cfg = load_config(cfg_path)
    for what, path in (("train.storage_path", cfg.train.storage_path), ("data.root", cfg.data.root),
                       ("model.weights", cfg.model.weights)):
        assert any(os.path.commonpath([path, m]) == m for m in mounted), \
            f"{cfg_path}: {what}={path} is not on a volume shared by all nodes ({mounted})"
    assert any("mount -t nfs4" in c and "/shared" in c for c in config["initialization_commands"])


def test_no_secrets_in_cluster_yaml():
    text = CLUSTER_YAML.read_text()
    assert secrets_in(text) == []
    # The scanner itself must catch what it looks for.
    leaked = text + "\n# aws_secret_access_key: x\n# key AKIAABCDEFGHIJKLMNOP\n# docker login --password hunter2\n"
    assert len(secrets_in(leaked)) == 3


def uploaded_by_ray_job_submit(root: Path) -> set[str]:
    """The files Ray 2.60 packs for ``--working-dir root`` (its own walk: .gitignore + .rayignore)."""
    from ray._private.runtime_env.packaging import _dir_travel

    files = set()
    _dir_travel(root, [], lambda p: p.is_file() and files.add(p.relative_to(root).as_posix()), include_gitignore=True)
    return files


def test_rayignore_keeps_git_and_weights_out_of_every_job_but_ships_the_code(tmp_path):
    for name in (".rayignore", ".gitignore"):
        (tmp_path / name).write_text((REPO / name).read_text())
    for f in (".git/objects/pack/pack-1.pack", ".git/HEAD", "cpal_ray/cpal/bank.py", "configs/a.yaml",
              "resnet50-imagenet.pth", "VOCtrainval_11-May-2012.tar", ".venv/bin/python", "docs/cluster.md"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    assert uploaded_by_ray_job_submit(tmp_path) == {".rayignore", ".gitignore", "cpal_ray/cpal/bank.py",
                                                    "configs/a.yaml", "docs/cluster.md"}


def test_rayignore_leaves_out_no_file_of_the_repository():
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    shipped = uploaded_by_ray_job_submit(REPO)
    assert [f for f in tracked if f not in shipped and (REPO / f).is_file()] == []
