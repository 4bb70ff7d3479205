"""The console script as a person meets it (issue 27, items 9-12): ``cpal-ray --help`` at once and
without torch, "did you mean" for commands and config keys, overrides among the flags, text
fields that stay text, errors that name the flag typed, ``--print-config``. Each test runs the
console script in a subprocess (``python -m workflows.cli`` is what ``cpal-ray`` runs)."""
import importlib
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def cpal_ray(*args, python_flags=()):
    return subprocess.run([sys.executable, *python_flags, "-m", "workflows.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": REPO})


def test_help_lists_every_command_with_its_description_without_importing_torch_or_ray():
    from workflows.cli import COMMANDS

    proc = cpal_ray("--help", python_flags=("-X", "importtime"))
    assert proc.returncode == 0 and proc.stdout.startswith("usage: cpal-ray ")
    flat = " ".join(proc.stdout.split())
    for command, (_, description) in COMMANDS.items():
        assert f" {command} " in flat and " ".join(description.rstrip(".").split()) in flat, command
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert not imported & {"torch", "ray", "numpy", "pyarrow"}, sorted(imported & {"torch", "ray", "numpy", "pyarrow"})


def test_each_description_is_the_first_line_of_the_commands_docstring():
    from workflows.cli import COMMANDS

    for command, (module, description) in COMMANDS.items():
        doc = importlib.import_module(f"workflows.{module}").__doc__
        assert doc.strip().splitlines()[0] == description, command


def test_a_mistyped_command_gets_a_suggestion_and_version_is_printed():
    proc = cpal_ray("trian")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("cpal-ray: error: unknown command 'trian'; did you mean 'train'? "
                                                    "(cpal-ray --help lists them)")
    proc = cpal_ray("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cpal-ray ")


def test_an_unknown_config_key_blames_the_override_and_suggests_the_field():
    proc = cpal_ray("train", "--config", "configs/synthetic_tiny.yaml", "cpal.tauu=0.2")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: override cpal.tauu=0.2: cpal.tauu: unknown field; did you mean cpal.tau? ")
    proc = cpal_ray("train", "--config", "configs/synthetic_tiny.yaml", "cpall.tau=0.2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: override cpall.tau=0.2: cpall: unknown field; "
                                                           "did you mean cpal? ")


def test_overrides_among_flags_text_stays_text_and_print_config_shows_the_resolved_config():
    proc = cpal_ray("train", "train.epochs=3", "--config", "configs/synthetic_tiny.yaml", "train.name=001",
                    "--print-config", "cpal.tau=0.25")
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["name"] == "001" and cfg["cpal"]["tau"] == 0.25
    assert cfg["model"]["backbone"] == "tiny"  # from the YAML


def test_a_bad_flag_value_names_the_flag_not_the_field():
    proc = cpal_ray("make-cams", "--checkpoint", "nowhere", "--cam-cpus", "-1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --cam-cpus -1.0: must be > 0 (inference.actor_cpus)"]


def test_usage_errors_exit_2_with_error():
    proc = cpal_ray("pseudo-labels", "--split", "train")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("cpal-ray pseudo-labels: error: give --cams (saved CAM files) or "
                                                    "--checkpoint (CAMs computed on the fly)")


def test_seeds_is_a_folder_and_sweep_counts_repeats():
    sweep = cpal_ray("sweep", "--help").stdout
    assert "--repeats" in sweep and "--seeds" not in sweep
    for command in ("train-affinity", "make-masks"):
        assert "--seeds SEEDS" in cpal_ray(command, "--help").stdout, command


def test_command_help_shows_cpal_ray_examples_with_their_line_continuations_and_no_rest_markup():
    proc = cpal_ray("train", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: cpal-ray train ")
    assert "\n    cpal-ray train --config configs/synthetic_tiny.yaml train.epochs=2\n" in proc.stdout
    # a `ray job submit` entrypoint keeps the python -m form, and its continuation line stays a line
    assert "-- python -m workflows.train --config configs/voc_resnet50_8gpu.yaml \\\n        train.storage_path=" \
        in proc.stdout
    for command in ("make-cams", "eval-cams", "sweep", "pseudo-labels"):
        assert "``" not in cpal_ray(command, "--help").stdout, command
