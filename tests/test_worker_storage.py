"""A training run checks, before its first epoch, that a node a worker runs on can write its
storage (on AWS the GPU workers get no instance profile unless cluster.yaml gives them one, and
the first checkpoint upload would fail after a paid epoch)."""
import pytest

from cpal_ray.config import ConfigError, load_config
from cpal_ray.storage import location

pytestmark = pytest.mark.ray


def test_storage_a_worker_cannot_write_fails_naming_the_folder_and_the_node(ray_start_2_cpus, tmp_path):
    from cpal_ray.distributed.trainer import check_storage_from_worker

    cfg = load_config("configs/synthetic_tiny.yaml", ["dist.cpus_per_worker=0.2"])
    writable = location(str(tmp_path / "runs" / "ok"))
    check_storage_from_worker(cfg, writable)
    assert list((tmp_path / "runs" / "ok").iterdir()) == []  # the probe file is gone
    (tmp_path / "blocked").write_text("a file where the run folder's parent should be")
    with pytest.raises(ConfigError) as err:
        check_storage_from_worker(cfg, location(str(tmp_path / "blocked" / "run")))
    message = str(err.value)
    assert "\n" not in message
    assert f"cannot write to folder {tmp_path / 'blocked' / 'run'}" in message
    assert f"on node {ray_start_2_cpus.util.get_node_ip_address()}" in message


def test_run_training_checks_the_storage_before_the_bank_and_the_workers_start(monkeypatch, tmp_path):
    from cpal_ray.distributed import trainer

    def refuse(cfg, run_dir):
        raise ConfigError(f"a worker cannot write {run_dir}")

    def must_not_start(*args, **kwargs):
        raise AssertionError("started before the storage check")

    monkeypatch.setattr(trainer, "check_storage_from_worker", refuse)
    monkeypatch.setattr(trainer, "create_bank_actors", must_not_start)
    monkeypatch.setattr(trainer, "build_trainer", must_not_start)
    cfg = load_config("configs/synthetic_tiny.yaml", [f"train.storage_path={tmp_path}", "train.name=probe"])
    with pytest.raises(ConfigError, match=f"a worker cannot write {tmp_path / 'probe'}"):
        trainer.run_training(cfg)
