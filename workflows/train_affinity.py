r"""Train IRN's boundary (affinity) network on the CRF seeds of a CAM run, on Ray Train.

    python -m workflows.train_affinity --from results/voc-mini-cpu/final --seeds results/voc-mini-cpu/pseudo-labels-train
    python -m workflows.train_affinity --config configs/voc_resnet50_8gpu.yaml --seeds s3://bucket/pseudo/<name> \
        affinity.epochs=3
    ray job submit --working-dir . -- python -m workflows.train_affinity --from s3://bucket/runs/<name>/final \
        --seeds s3://bucket/pseudo/<name>

The base config is ``--config``, else the ``config.yaml`` of ``--from`` (the CAM run), plus the
overrides; the run's own settings come from ``affinity.*`` (epochs, batch, lr, crop, radius) and it
is named ``<train.name>-affinity`` in ``train.storage_path``. The seeds are
``workflows.pseudo_labels`` PNGs (255 = unknown) for the training split. The backbone is frozen
(IRN); the run folder, checkpoints, resume (same name) and ``final/`` are those of
``workflows.train``. Bad inputs (config, seed folder, ids without a seed PNG, weights) are reported
before Ray starts, with nothing written; the exit status is then 2.
"""
from __future__ import annotations

from workflows.common import run, stage_training_main


def main(argv=None) -> int:
    return stage_training_main(__doc__, "affinity", "seeds", "affinity.seeds_dir", argv)


if __name__ == "__main__":
    run(main)
