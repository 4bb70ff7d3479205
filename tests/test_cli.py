"""What a person sees when a command is wrong: one line naming the field (and the override or
file it came from), exit status 2, no traceback; the console script; configs found from anywhere."""
import subprocess
import sys

import pytest

from cpal_ray.config import ConfigError, load_config
from tests.conftest import REPO

pytestmark = pytest.mark.unit


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("argv, expected", [
    (["workflows.train", "--config", "configs/synthetic_tiny.yaml", "optim.lr=abc"],
     "error: override optim.lr=abc: optim.lr: must be a number, got 'abc'"),
    (["workflows.train", "--config", "configs/synthetic_tiny.yaml", "cpal.metric=euclid"],
     "error: override cpal.metric=euclid: cpal.metric: unknown metric 'euclid'; choose from ('dot', 'l1', 'l2', 'cosine')"),
    (["workflows.train_affinity", "--config", "configs/synthetic_tiny.yaml", "train.epochs=1", "--print-config"],
     "error: override train.epochs=1: train.epochs: the affinity stage trains affinity.epochs; set that"),
    (["workflows.make_cams", "--checkpoint", "x", "--config", "configs/nope.yaml"],
     "error: configs/nope.yaml: config file not found (shipped configs: attributes_tiny, coco_resnet50_8gpu, "
     "synthetic_tiny, voc_mini_cpu, voc_resnet50_8gpu)"),
])
def test_a_config_error_is_one_line_and_exit_2(argv, expected):
    proc = run_cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [expected] and "Traceback" not in proc.stderr


def test_a_yaml_typo_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cpal:\n  tau: 0.2\n  top_k: [1, 2\n")
    proc = run_cli("workflows.sweep", "--space", "k_tau", "--config", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {bad}: not valid YAML at line ") and "column" in line


def test_scientific_notation_and_shipped_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    cfg = load_config("configs/voc_mini_cpu.yaml", ["optim.lr=1e-3", "optim.weight_decay=5e-4"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4 and cfg.model.backbone == "efficientnet_lite0"
    assert load_config("synthetic_tiny") == load_config("configs/synthetic_tiny.yaml")
    with pytest.raises(ConfigError, match="override train.epochs=1.5: train.epochs: must be an integer"):
        load_config("synthetic_tiny", ["train.epochs=1.5"])


def test_console_script_dispatches_to_the_workflows():
    from workflows import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", "configs/synthetic_tiny.yaml", "train.epochs=0"])
    assert exit_info.value.code == 2  # the same error path as python -m workflows.train
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2


def test_every_console_command_is_a_workflow_with_a_main_and_is_listed_in_the_readme():
    import importlib.util
    import re

    from workflows import cli

    for command, (module, _) in cli.COMMANDS.items():
        spec = importlib.util.find_spec(f"workflows.{module}")
        assert spec is not None, command
        assert re.search(r"^def main\(", open(spec.origin).read(), re.M), command
    listed = re.search(r"`cpal-ray ([a-z|-]+) …`", open(f"{REPO}/README.md").read()).group(1).split("|")
    assert sorted(listed) == sorted(cli.COMMANDS)


def test_run_keeps_the_traceback_only_of_a_system_error_naming_no_file(capsys):
    from workflows.common import run

    def ours(argv):
        raise FileNotFoundError("weights file not found: /x.pth")

    with pytest.raises(SystemExit) as done:
        run(ours, [])
    assert done.value.code == 2 and "weights file not found: /x.pth" in capsys.readouterr().err

    def system(argv):  # what os.getcwd() raises when the working folder was deleted
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(FileNotFoundError):
        run(system, [])


@pytest.mark.parametrize("command", ["train", "pipeline", "train-affinity", "convert-labels"])
def test_help_shows_the_docstring_examples(command, capsys, monkeypatch):
    from workflows import cli

    module = cli.COMMANDS[command][0]
    monkeypatch.setattr(sys, "argv", ["cpal-ray", command, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cpal-ray {command} ")
    assert f"    cpal-ray {command} " in out  # an example command from the docstring, as cpal-ray runs it
    assert f"\n    python -m workflows.{module} " not in out
