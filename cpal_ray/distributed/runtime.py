"""Connecting to Ray from a workflow (library code never calls ``ray.init`` on its own).

Inside ``ray job submit`` Ray sets ``RAY_ADDRESS`` and ``ray.init()`` joins that cluster. Run
directly, a workflow starts its own local Ray (``address="local"``), so a stale
``ray_current_cluster`` file of a crashed head is never picked up by accident; pass
``--address auto`` (or an address) to join a running cluster instead.
"""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Join ``address`` / ``$RAY_ADDRESS`` if given, else start a local Ray. Returns how it connected."""
    if ray.is_initialized():
        return "already initialised"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace="cpal-ray", log_to_driver=True)
        how = f"joined Ray at {address}"
    else:
        kwargs = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)) if v is not None}
        ray.init(address="local", namespace="cpal-ray", **kwargs)
        how = "started a local Ray"
    log.info(how)
    return how
