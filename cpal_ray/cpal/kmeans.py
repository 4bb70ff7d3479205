"""Eq. (5): context prototypes p_i = mean of the bank entries in k-means cluster G_i, via faiss.

faiss is not a base dependency: the ``cpu`` extra installs faiss-cpu, the ``gpu`` extra
faiss-gpu (CUDA 12), and exactly one of them belongs in an environment (both provide the ``faiss``
module). faiss runs on the GPU when ``faiss.get_num_gpus() > 0`` and a GPU k-means works in this
process's GPU (``faiss_gpu_usable``), on the CPU otherwise. The device that actually ran is
returned and logged: faiss-gpu imports without a GPU and then silently runs on the CPU, so never
assume.

A faiss build without code for the GPU (faiss-gpu-cu12 1.14 carries sm_70 and sm_80 only: no
Hopper) does not raise: its first CUDA kernel fails inside a faiss assertion, which aborts the
whole process. So the first GPU k-means of a process is tried in a child process; when that one
dies, k-means runs on the CPU for the rest of this process, with one WARNING.
"""
from __future__ import annotations

import functools
import logging
import subprocess
import sys
from importlib import metadata

import numpy as np

log = logging.getLogger(__name__)

# The child process's k-means: a few iterations on a small random set, on GPU 0 of the devices this
# process sees (a Ray actor's CUDA_VISIBLE_DEVICES is inherited).
GPU_PROBE = """
import numpy as np, faiss
x = np.random.default_rng(0).standard_normal((2048, 32)).astype("float32")
km = faiss.Kmeans(32, 8, niter=2, seed=1, gpu=True, verbose=False)
km.train(x)
assert np.isfinite(km.centroids).all()
print("faiss gpu k-means ok")
"""
GPU_PROBE_TIMEOUT_S = 300

FAISS_MISSING = ("faiss is not installed: pip install 'cpal-ray[cpu]' (CPU) or 'cpal-ray[gpu]' (CUDA 12); "
                 "from a checkout: pip install -e '.[cpu]' or -e '.[gpu]' (one of the two, not both)")


class FaissNotInstalledError(ImportError):
    """No faiss build is installed; the message names the two extras that bring one."""


def installed_faiss_builds() -> list[str]:
    """Names of the installed distributions that provide ``faiss`` (faiss-cpu, faiss-gpu-cu12, ...)."""
    names = {(d.metadata["Name"] or "").lower() for d in metadata.distributions()}
    return sorted(n for n in names if n == "faiss" or n.startswith("faiss-"))


@functools.cache
def _warn_if_several_builds() -> None:
    builds = installed_faiss_builds()
    if len(builds) > 1:
        log.warning("several faiss builds are installed (%s); they share the `faiss` module and one shadows the "
                    "other: keep one extra, cpal-ray[cpu] or cpal-ray[gpu]", ", ".join(builds))


def import_faiss():
    """The ``faiss`` module, or FaissNotInstalledError naming the ``cpu`` and ``gpu`` extras.

    Only a missing module is translated; a faiss that is installed but fails to load (e.g. a
    CUDA library not found) raises its own error unchanged."""
    try:
        import faiss
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        raise FaissNotInstalledError(FAISS_MISSING) from e
    _warn_if_several_builds()
    return faiss


def faiss_device(prefer_gpu: bool = True) -> str:
    """'gpu' when faiss sees a GPU (and it is wanted), else 'cpu'."""
    faiss = import_faiss()
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return "gpu" if prefer_gpu and n > 0 else "cpu"


def _run_gpu_probe() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True,
                          timeout=GPU_PROBE_TIMEOUT_S, check=False)


@functools.cache
def faiss_gpu_usable() -> bool:
    """Whether a faiss GPU k-means runs in this process's GPU, tried once per process in a child
    process (a faiss without kernels for the device aborts the process that runs it). False with
    one WARNING otherwise; the bank then clusters on the CPU."""
    try:
        probe = _run_gpu_probe()
        failed = probe.returncode != 0
        detail = f"exit status {probe.returncode}" + (
            f": {lines[-1].strip()}" if (lines := (probe.stderr or "").strip().splitlines()) else "")
    except (OSError, subprocess.TimeoutExpired) as e:
        failed, detail = True, f"{type(e).__name__}: {e}"
    if failed:
        log.warning("faiss cannot run k-means on this GPU (a GPU k-means in a child process failed: %s); k-means "
                    "runs on the CPU in this process. Install a faiss build with code for this GPU: "
                    "pip install 'cpal-ray[gpu]' (docs/install.md)", detail)
    return not failed


def kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 1234, spherical: bool = False,
           prefer_gpu: bool = True, nredo: int = 5) -> tuple[np.ndarray, str]:
    """Cluster rows of x into k groups and return the centroids (Eq. 5) and the device used.

    x: (M, D) float32. When M <= k the entries are returned as they are (a class with fewer bank
    entries than N_p uses its entries: DESIGN.md, 'Reading the paper: cold start'). ``spherical``
    re-normalises centroids to the unit sphere after each iteration (for L2-normalised bank
    entries). Initialisation is k-means++ and the best of ``nredo`` runs is kept: a single random start left the inertia
    9 % (up to 30 % for one class) above a 10-restart reference (bench/bench_kmeans.py).
    Returns (centroids (min(M, k), D) float32, "gpu" | "cpu" | "none").
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (M, D), got shape {x.shape}")
    if x.shape[0] <= k:
        return x.copy(), "none"
    faiss = import_faiss()
    device = faiss_device(prefer_gpu)
    if device == "gpu" and not faiss_gpu_usable():
        device = "cpu"
    extra = {}
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # faiss >= 1.13
        extra["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, spherical=spherical, gpu=device == "gpu",
                      nredo=max(1, nredo), min_points_per_centroid=1, max_points_per_centroid=1_000_000,
                      verbose=False, **extra)
    km.train(x)
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1]), device


def kmeans_inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances from each row of x to its nearest centroid (for checks/benchmarks)."""
    d = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return float(d.min(1).sum())
