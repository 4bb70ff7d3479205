"""The ``cpal-ray`` commands: each one's module of ``workflows/`` and description (the first line of
its docstring; tests keep them equal). Plain data, so that ``cpal-ray --help`` lists them without
importing torch or Ray, and both the console script (``workflows.cli``) and the help of each
command (``workflows.common.doc_parser``) read them without importing each other.
"""
from __future__ import annotations

# command: (module of workflows/, the first line of its docstring)
COMMANDS = {
    "train": ("train", "Train CPAL (or the BCE baseline with cpal.enabled=false) on Ray Train."),
    "sweep": ("sweep", "Ray Tune ablation sweep: every trial trains with Ray Train, then evaluates seed mIoU."),
    "make-cams": ("make_cams", "Multi-scale (+flip) CAM files for one dataset split, on Ray Data."),
    "eval-cams": ("eval_cams", "Seed mIoU of CAMs: background-threshold sweep (or one fixed threshold), per-class "
                               "IoU, plot."),
    "pseudo-labels": ("pseudo_labels", "CRF pseudo-labels (IRN recipe) for a dataset split on Ray Data, then their "
                                       "mIoU against the GT."),
    "convert-labels": ("convert_labels", "Convert an image-level label file (cls_labels.npy of the WSSS code bases) "
                                         "to plain JSON."),
    "demo": ("demo", "The demo: CAM baseline vs CPAL on the bundled real photos, end to end, with a report."),
    "train-affinity": ("train_affinity", "Train IRN's boundary (affinity) network on the CRF seeds of a CAM run, on "
                                         "Ray Train."),
    "make-masks": ("make_masks", "Pseudo masks by random walk (IRN) for a dataset split, on Ray Data, then the "
                                 "Table-4 scores."),
    "train-seg": ("train_seg", "Train the segmentation network (DeepLabV3 head on the config's backbone) on pseudo "
                               "masks, on Ray Train."),
    "eval-seg": ("eval_seg", "Score a trained segmenter on a split (val by default): predictions on Ray Data, then "
                             "mIoU."),
    "predict": ("predict", "Segment your own photos with a trained segmenter: a folder of images in, palette PNGs "
                           "out."),
    "pipeline": ("pipeline", "The whole WSSS pipeline for one config: CAM training -> CAMs -> CRF -> affinity -> "
                             "masks -> segmenter -> val mIoU."),
}
