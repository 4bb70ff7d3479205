"""Connecting to Ray from a workflow, and checking where its outputs go (library code never calls
``ray.init`` on its own).

Ray's own rule: a driver joins the cluster it is pointed at (``--address`` / ``$RAY_ADDRESS``;
inside ``ray job submit`` Ray sets it), else a cluster running on this machine (``ray start``
on a head node), else it starts a local Ray. ``--address local`` (or ``--num-cpus``) asks for a
private local Ray even where a cluster runs, as tests do.

The workers' output that Ray prints in the driver has no colour codes unless the driver's output
is an interactive terminal (``plain_worker_output``: a log file, a job's log, CI get plain text).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import ray

from cpal_ray.config import ConfigError
from cpal_ray.storage import Location, is_uri, location

log = logging.getLogger(__name__)
NAMESPACE = "cpal-ray"


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Connect as described in the module docstring. Returns how it connected."""
    if ray.is_initialized():
        return "already initialised"
    plain_worker_output()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None and (num_cpus is not None or num_gpus is not None):
        address = "local"  # resources can only be given to a Ray we start
    if address == "local":
        kwargs = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
        ray.init(address="local", namespace=NAMESPACE, **kwargs)
        how = "started a private local Ray"
    elif address is not None:
        ray.init(address=address, namespace=NAMESPACE)
        how = f"joined the Ray cluster at {address}"
    else:
        ray.init(namespace=NAMESPACE)  # a running cluster of this machine if there is one, else a new local Ray
        how = f"connected to Ray (gcs {ray.get_runtime_context().gcs_address})"
    log.info(how)
    return how


def actor_device():
    """The torch device of a Ray actor or task: ``cuda`` only when Ray granted it a GPU.

    Ray 2.60 no longer hides the GPUs from actors that asked for none (``CUDA_VISIBLE_DEVICES`` is
    left as it is), so ``torch.cuda.is_available()`` is true in every actor of a GPU node: a CPU
    actor choosing from it would load its model onto ``cuda:0`` outside Ray's accounting. For an
    actor holding a GPU (or a share of one) Ray sets ``CUDA_VISIBLE_DEVICES`` to what it granted,
    so that GPU is ``cuda``. Outside Ray (a local run) the CPU.
    """
    import torch

    gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpu_ids:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"Ray granted GPU {', '.join(map(str, gpu_ids))} to this actor but torch "
                           f"{torch.__version__} sees no CUDA device: install the CUDA build of torch "
                           "(docs/install.md) or run without GPUs (--no-gpu)")
    return torch.device("cuda")


def interactive() -> bool:
    """Whether the driver's stderr is an interactive terminal (a person watching)."""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def plain_worker_output() -> None:
    """No colour codes unless stderr is a terminal: around the workers' lines Ray prints here
    (``RAY_COLOR_PREFIX=0``, read by Ray as it prints; a value the user set is kept) and in Ray's
    own log lines of this process (the dashboard's address)."""
    if not interactive():
        from cpal_ray.engine.progress import shorten_log_lines

        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        shorten_log_lines("ray", limit=None, plain=True)


def output_location(where: str, field: str) -> Location:
    """The ``Location`` of an output path or URI given by config field / flag ``field``.

    A relative path inside a Ray job that has a ``working_dir`` would land in the job's temporary
    copy of that folder and be lost when the job ends: refused with a message naming ``field``.
    """
    if not is_uri(where) and not Path(where).expanduser().is_absolute() and ray.is_initialized():
        working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
        if working_dir:
            raise ConfigError(f"{field}={where!r} is a relative path: inside `ray job submit --working-dir` it "
                              "would be written into the job's temporary copy of the working directory and lost; "
                              "give an absolute path on storage every node shares, or a URI (s3://bucket/runs)")
    return location(where)
