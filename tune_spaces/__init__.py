"""The sweep spaces shipped with cpal-ray: one module per table or figure of the paper.

Each module is plain data (``param_space()``, and ``ROWS`` / ``REQUIRES`` / ``PAPER`` where
needed); the contract and the helpers that read a space are in ``cpal_ray.sweeps.spaces``.
Run one with ``python -m workflows.sweep --space tune_spaces.<name>`` (or just ``<name>``).
"""
