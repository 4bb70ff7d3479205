"""Config: paper defaults, YAML + dotted overrides, round trip, and clear validation errors."""
import dataclasses

import pytest

from cpal_ray.config import Config, ConfigError, load_config, parse_overrides, save_config

pytestmark = pytest.mark.unit


def test_defaults_are_the_papers():
    c = Config()
    assert (c.cpal.tau, c.cpal.bank_size, c.cpal.num_clusters, c.cpal.top_k, c.cpal.metric) == (0.1, 1000, 50, 20, "dot")
    assert (c.cpal.lambda_bce, c.cpal.lambda_self, c.cpal.gamma) == (1.0, 1.0, 1.0)
    assert (c.optim.lr, c.optim.new_layer_lr_mult, c.optim.momentum, c.optim.weight_decay, c.optim.poly_power) == \
        (0.1, 10.0, 0.9, 1e-4, 0.9)
    assert (c.train.epochs, c.train.batch_size, c.data.crop_size, c.data.resize_long) == (5, 16, 512, (320, 640))
    assert c.inference.scales == (1.0, 0.5, 1.5, 2.0) and c.inference.flip


@pytest.mark.parametrize("override,field,words", [
    ({"cpal.tau": 1.0}, "cpal.tau", "(0, 1)"),
    ({"cpal.tau": 0.0}, "cpal.tau", "(0, 1)"),
    ({"cpal.top_k": 60}, "cpal.top_k", "num_clusters=50"),
    ({"cpal.num_clusters": 2000}, "cpal.num_clusters", "bank_size=1000"),
    ({"model.backbone": "vit"}, "model.backbone", "resnet50"),
    ({"cpal.metric": "manhattan"}, "cpal.metric", "dot"),
    ({"optim.lr": -0.1}, "optim.lr", "> 0"),
    ({"optim.momentum": 1.0}, "optim.momentum", "[0, 1)"),
    ({"data.dataset": "ade"}, "data.dataset", "voc"),
    ({"cpal.tau": "high"}, "cpal.tau", "number"),
    ({"cpal.enabled": "yes"}, "cpal.enabled", "true or false"),
    ({"dist.num_workers": 3}, "train.batch_size", "divisible"),
    ({"cpal.taux": 0.2}, "cpal.taux", "unknown field"),
])
def test_invalid_values_name_the_field(override, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert field in str(e.value) and words in str(e.value)


def test_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cpal:\n  tau: 0.2\ndata:\n  resize_long: [100, 200]\n")
    cfg = load_config(path, ["cpal.top_k=10", "model.backbone=tiny", "inference.scales=[1.0, 0.5]"])
    assert cfg.cpal.tau == 0.2 and cfg.cpal.top_k == 10 and cfg.model.backbone == "tiny"
    assert cfg.data.resize_long == (100, 200) and cfg.inference.scales == (1.0, 0.5)
    saved = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(saved) == cfg
    assert cfg.replace(**{"cpal.tau": 0.3}).cpal.tau == 0.3 and cfg.cpal.tau == 0.2  # frozen copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpal.tau = 0.5  # frozen


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpal:\n  tau: 2.0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: cpal\.tau"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("cpal: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_override_parsing():
    assert parse_overrides(["a.b=1", "c.d=x", "e.f=[1, 2]", "g.h=false"]) == {"a.b": 1, "c.d": "x", "e.f": [1, 2], "g.h": False}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["tau"])
    with pytest.raises(ConfigError, match="section.field"):
        load_config(None, {"tau": 0.2})


def test_pseudo_presets():
    assert Config().pseudo.thresholds == (0.30, 0.05)
    assert load_config(None, {"pseudo.preset": "amn"}).pseudo.thresholds == (0.45, 0.15)
    assert load_config(None, {"pseudo.preset": "custom", "pseudo.conf_fg": 0.5}).pseudo.thresholds == (0.5, 0.05)


def test_a_config_saved_before_the_faults_section_and_the_actor_fields_still_loads(tmp_path, caplog):
    """A run's config.yaml written by an older cpal-ray (dist.crash_* at their off values, the old
    actor resource names) loads: no fault, the same resources under their new names."""
    from cpal_ray.config import load_config

    saved = tmp_path / "config.yaml"
    saved.write_text("dist:\n  crash_rank: -1\n  crash_step: -1\n  crash_wait_s: 0.0\n"
                     "inference:\n  cam_cpus: 2.0\n  max_cam_actors: 3\npseudo:\n  cpus_per_task: 0.25\n")
    cfg = load_config(saved)
    assert not cfg.faults.enabled
    assert (cfg.inference.actor_cpus, cfg.inference.max_actors, cfg.pseudo.actor_cpus) == (2.0, 3, 0.25)
    bank_kill = load_config(None, ["dist.crash_rank=-2", "dist.crash_step=3"]).faults
    assert (bank_kill.target, bank_kill.at_step) == ("bank", 3)
    again = load_config(None, ["dist.crash_rank=-2", "dist.crash_step=3"]).faults  # warned once, read every time
    assert (again.target, again.at_step) == ("bank", 3)
