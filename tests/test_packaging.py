"""The faiss builds are separate extras (`cpu`, `gpu`), every documented install picks exactly
one of them, and a missing faiss fails with a message naming both."""
import builtins
import importlib
import logging
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

# The module, not the `kmeans` function that cpal_ray.cpal re-exports under the same name.
km = importlib.import_module("cpal_ray.cpal.kmeans")

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
# Where the project tells people how to install it.
INSTALL_DOCS = ["README.md", ".ci/run", "docs/install.md", "docs/cluster.md", "bench/README.md", "cluster.yaml"]
EXTRAS = re.compile(r"""(?:-e\s+|cpal-ray)['"]?\.?\[([a-z0-9_,-]+)\]""")


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_faiss_is_only_in_the_cpu_and_gpu_extras():
    p = project()
    assert not [d for d in p["dependencies"] if d.lower().startswith("faiss")], "faiss in the base dependencies"
    extras = p["optional-dependencies"]
    assert extras["cpu"] == ["faiss-cpu"]
    assert extras["gpu"] == ["faiss-gpu==1.15.1"]  # native code up to sm_90 (Hopper): docs/install.md
    for name, deps in extras.items():
        if name not in ("cpu", "gpu"):
            assert not [d for d in deps if d.lower().startswith("faiss")], f"extra {name} brings a faiss build"


def documented_installs() -> list[tuple[str, set[str]]]:
    """(file: line, extras) for every `pip install -e '.[…]'` / `cpal-ray[…]` in the install docs."""
    found = []
    for rel in INSTALL_DOCS:
        for line in (REPO / rel).read_text().splitlines():
            if "pip install" in line:
                found += [(f"{rel}: {line.strip()}", set(m.split(","))) for m in EXTRAS.findall(line)]
    return found


def test_every_documented_install_picks_exactly_one_faiss_extra():
    installs = documented_installs()
    assert len(installs) >= 6, installs
    for where, extras in installs:
        assert len(extras & {"cpu", "gpu"}) == 1, f"needs exactly one of the cpu/gpu extras: {where}"


def test_readme_and_ci_run_the_same_cpu_install():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert readme.count("pip install -e '.[cpu,dev]'") == 2, "the README's two commands"
    assert "pip install -q -e '.[cpu,dev]'" in ci


@pytest.fixture
def no_faiss(monkeypatch):
    """`import faiss` fails as it does when neither extra is installed."""
    monkeypatch.setitem(sys.modules, "faiss", None)


def test_missing_faiss_names_both_extras(no_faiss):
    with pytest.raises(km.FaissNotInstalledError) as err:
        km.faiss_device()
    assert isinstance(err.value, ImportError)
    assert "cpal-ray[cpu]" in str(err.value) and "cpal-ray[gpu]" in str(err.value)
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ImportError, match=r"pip install 'cpal-ray\[cpu\]' \(CPU\) or 'cpal-ray\[gpu\]' \(CUDA 12\)"):
        km.kmeans(x, k=3)
    # Nothing to cluster needs no faiss.
    assert km.kmeans(x[:2], k=3)[1] == "none"


def test_a_faiss_that_fails_to_load_keeps_its_own_error(monkeypatch):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("libcudart.so.12: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ImportError, match="libcudart") as err:
        km.import_faiss()
    assert not isinstance(err.value, km.FaissNotInstalledError)


def test_two_faiss_builds_are_reported(monkeypatch, caplog):
    monkeypatch.setattr(km, "installed_faiss_builds", lambda: ["faiss-cpu", "faiss-gpu-cu12"])
    km._warn_if_several_builds.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=km.__name__):
            km.import_faiss()
    finally:
        km._warn_if_several_builds.cache_clear()
    assert "faiss-cpu, faiss-gpu-cu12" in caplog.text and "cpal-ray[gpu]" in caplog.text


def test_installed_faiss_builds_sees_this_environment():
    pytest.importorskip("faiss")
    builds = km.installed_faiss_builds()
    assert builds and all(b.startswith("faiss") for b in builds)


def test_a_built_wheel_ships_the_configs_and_the_console_script(tmp_path):
    """After a non-editable install, the demo's config loads from any directory (issue: packaging)."""
    import subprocess

    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("cpal_ray-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (target / "bin" / "cpal-ray").is_file() and (target / "cpal_ray" / "configs" / "voc_mini_cpu.yaml").is_file()
    probe = ("import cpal_ray, workflows.demo as d; from cpal_ray.config import load_config; "
             "print(cpal_ray.__file__); print(load_config(d.DEFAULT_CONFIG).model.backbone)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    module_file, backbone = out.stdout.split()
    assert module_file.startswith(str(target)) and backbone == "efficientnet_lite0"  # the wheel's copy, not the repo's


@pytest.fixture
def gpu_faiss(monkeypatch):
    """faiss as a GPU node shows it: one GPU; the GPU k-means probe's verdict is recomputed."""
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    km.faiss_gpu_usable.cache_clear()
    yield faiss
    km.faiss_gpu_usable.cache_clear()


def test_faiss_without_code_for_the_gpu_falls_back_to_cpu_with_one_warning(gpu_faiss, monkeypatch, caplog):
    """faiss-gpu-cu12 1.14 on an H100: its first kernel fails inside a faiss assertion, which aborts
    the process. The probe's child process dies that way; the caller clusters on the CPU."""
    monkeypatch.setattr(km, "GPU_PROBE", "import os, sys\nsys.stderr.write('Error: no kernel image is available "
                                         "for execution on the device\\n')\nsys.stderr.flush()\nos.abort()")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.1, (50, 4)) for c in (0.0, 5.0, 10.0)]).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger=km.__name__):
        for _ in range(2):
            cents, device = km.kmeans(x, 3, nredo=1)
            assert device == "cpu" and cents.shape == (3, 4)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "no kernel image is available" in warnings[0].getMessage()
    assert "runs on the CPU" in warnings[0].getMessage()


def test_a_gpu_k_means_that_works_in_the_child_keeps_the_gpu(gpu_faiss, monkeypatch, caplog):
    monkeypatch.setattr(km, "GPU_PROBE", "print('faiss gpu k-means ok')")
    with caplog.at_level(logging.WARNING, logger=km.__name__):
        assert km.faiss_gpu_usable() and km.faiss_device() == "gpu"
    assert caplog.records == []
