"""The whole WSSS pipeline for one config, stage after stage, skipping what is already complete.

    train CAM net ─► CAMs + CRF seeds (train) ─► train affinity net ─► masks (train) ─► train
    segmenter ─► predictions (val) ─► scores: Table 4 (seeds, CRF, pseudo masks on the training
    images, or the ``affinity.score_split`` among them) and Table 5 (the segmenter on
    ``seg.eval_split``, val by default)

Layout under ``out``::

    runs/<name>/final, runs/<name>-affinity/final, runs/<name>-seg/final   Ray Train runs
    pseudo-train/     CRF seeds (<id>.png) and the CAMs (cams/<id>.npz)      run_pseudo_labels
    masks-train/      pseudo masks                                          run_make_masks
    seg-val/          the segmenter's predictions on seg.eval_split         run_seg_predict
    pipeline.json     the scores and each stage's wall time (this run's; a skipped stage: ~0 s)

Restarting: a training stage whose ``final/`` verifies and has all its epochs is skipped (else
Ray Train resumes it from its last checkpoint); the per-image stages keep every file that
validates and redo the others. A killed pipeline started again therefore restarts where it stopped.
"""
from __future__ import annotations

import json
import logging
import time

from cpal_ray.config import Config
from cpal_ray.data import build_dataset
from cpal_ray.distributed.stages import run_make_masks, run_pseudo_labels, run_seg_predict
from cpal_ray.distributed.trainer import run_training
from cpal_ray.engine.checkpoint import CheckpointError, load_checkpoint
from cpal_ray.inference.evaluate import evaluate_cam_dir, evaluate_labels, write_json
from cpal_ray.formatting import strict_json
from cpal_ray.storage import Location, location

log = logging.getLogger(__name__)
STAGES = ("train_cam", "crf_seeds", "train_affinity", "masks", "train_seg", "eval_seg")


def trained(final: Location, epochs: int) -> bool:
    """True when ``final`` is a verified checkpoint of all ``epochs`` epochs (the stage is done)."""
    try:
        return int(load_checkpoint(final)["epoch"]) >= epochs
    except CheckpointError:
        return False


def train_stage(cfg: Config) -> Location:
    """Train ``cfg`` with Ray Train unless its ``final/`` is complete; returns ``final/``."""
    final = location(cfg.train.storage_path) / cfg.train.name / "final"
    if trained(final, cfg.training.epochs):
        log.info("%s: complete (%s), skipped", cfg.train.name, final)
        return final
    return run_training(cfg).final_dir


def stage_configs(cfg: Config, out: Location) -> dict[str, Config]:
    """The three training configs of a pipeline in ``out``: the CAM run and its two refine runs,
    with the label folders the refine stages read."""
    cam = cfg.replace(**{"train.storage_path": str(out / "runs"), "train.task": "cam"})
    return {"cam": cam,
            "affinity": cam.replace(**{"affinity.seeds_dir": str(out / "pseudo-train"),
                                       "affinity.cam_dir": str(out / "pseudo-train" / "cams")}).for_task("affinity"),
            "seg": cam.replace(**{"seg.masks_dir": str(out / "masks-train")}).for_task("seg")}


def run_pipeline(cfg: Config, out_dir, *, say=log.info) -> dict:
    """Run every stage of ``STAGES`` for ``cfg`` into ``out_dir`` (Ray must be initialised).

    Returns {"final": {task: final folder}, "scores": {"seeds", "crf", "masks", "seg_val"} (the
    evaluators' dicts), "timings": {stage: seconds}}, also written to ``<out>/pipeline.json``
    (scores reduced to their headline numbers)."""
    out = location(out_dir)
    cfgs = stage_configs(cfg, out)
    timings: dict[str, float] = {}
    scores: dict[str, dict] = {}
    final: dict[str, Location] = {}
    train_eval = build_dataset(cfg.data, cfg.affinity.score_split or "train", train=False)
    val_eval = build_dataset(cfg.data, cfg.seg.eval_split, train=False)

    def timed(name, fn):
        t0 = time.perf_counter()
        say(f"[pipeline] {name} ...")
        result = fn()
        timings[name] = time.perf_counter() - t0
        say(f"[pipeline] {name} done in {timings[name]:.0f}s")
        return result

    final["cam"] = timed("train_cam", lambda: train_stage(cfgs["cam"]))
    timed("crf_seeds", lambda: run_pseudo_labels(cfgs["cam"], out / "pseudo-train", checkpoint=final["cam"],
                                                 split="train"))
    scores["seeds"] = evaluate_cam_dir(out / "pseudo-train" / "cams", train_eval, cfgs["cam"])
    scores["crf"] = evaluate_labels(out / "pseudo-train", train_eval)
    final["affinity"] = timed("train_affinity", lambda: train_stage(cfgs["affinity"]))
    timed("masks", lambda: run_make_masks(cfgs["affinity"], final["affinity"], out / "masks-train",
                                          cam_dir=out / "pseudo-train" / "cams", split="train"))
    scores["masks"] = evaluate_labels(out / "masks-train", train_eval)
    final["seg"] = timed("train_seg", lambda: train_stage(cfgs["seg"]))
    timed("eval_seg", lambda: run_seg_predict(cfgs["seg"], final["seg"], out / "seg-val", split=cfg.seg.eval_split))
    scores["seg_val"] = evaluate_labels(out / "seg-val", val_eval)
    write_json(scores["seg_val"], out / "seg-val" / "seg_miou.json")
    summary = {"config": cfg.train.name, "scores": headline(scores), "seconds": timings,
               "final": {k: str(v) for k, v in final.items()}}
    (out / "pipeline.json").write_text(strict_json(summary, indent=2))
    say(f"[pipeline] {strict_json(summary['scores'])}")
    return {"final": final, "scores": scores, "timings": timings}


def headline(scores: dict) -> dict:
    """The numbers of Tables 4 and 5 (mIoU in [0, 1]): seeds (best over the background threshold,
    with it), CRF seeds (confident pixels only, with the ignored share), masks, segmenter on val."""
    out = {}
    if "seeds" in scores:
        out["seeds"] = {"miou": scores["seeds"]["best_miou"], "bg_threshold": scores["seeds"]["best_threshold"]}
    for key in ("crf", "masks", "seg_val"):
        if key in scores:
            out[key] = {"miou": scores[key]["miou"], "frac_ignored": scores[key]["frac_ignored"]}
    return out
