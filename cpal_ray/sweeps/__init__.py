"""Sweeps without Ray: space modules (``spaces``) and the tables and plots of a result grid (``report``).

The Ray Tune driver that runs a sweep is ``cpal_ray.distributed.tune``.
"""
