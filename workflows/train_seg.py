r"""Train the segmentation network (DeepLabV3 head on the config's backbone) on pseudo masks, on Ray Train.

    python -m workflows.train_seg --from results/voc-mini-cpu/final --masks results/voc-mini-cpu-affinity/masks-train
    python -m workflows.train_seg --config configs/voc_resnet50_8gpu.yaml --masks s3://bucket/masks/<name> seg.epochs=30
    ray job submit --working-dir . -- python -m workflows.train_seg --from s3://bucket/runs/<name>/final \
        --masks s3://bucket/masks/<name>

The base config is ``--config``, else the ``config.yaml`` of ``--from`` (the CAM run), plus the
overrides; the run's settings come from ``seg.*`` (epochs, batch, lr, crop) and it is named
``<train.name>-seg``. The masks are ``workflows.make_masks`` PNGs (255, where present, is
ignored). Checkpoints, resume and ``final/`` as ``workflows.train``; then ``workflows.eval_seg``
scores it on val and ``workflows.predict`` segments your own photos. Bad inputs are reported
before Ray starts, with nothing written; the exit status is then 2.
"""
from __future__ import annotations

from workflows.common import run, stage_training_main


def main(argv=None) -> int:
    return stage_training_main(__doc__, "seg", "masks", "seg.masks_dir", argv)


if __name__ == "__main__":
    run(main)
