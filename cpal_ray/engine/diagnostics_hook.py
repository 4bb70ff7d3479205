"""What CPAL did in each epoch, in the run's history: was it active, and what did it do to the maps.

``DiagnosticsHook`` (one of the CAM network's hooks, ``engine.tasks.task_hooks``) runs at the end
of every epoch, after the clustering (so the PACAM is the one the next epoch trains against) and
before the checkpoint. Every rank adds the bank's view; rank 0
also scores the first ``train.diag_images`` training images (the WSSS protocol scores seeds on the
training images; a fixed subsample, evaluation transform, single scale, no flip):

  classes_below_k                 classes whose bank holds fewer entries than top-K
  diag_cam_miou / _threshold      seed mIoU of the CAM (background-threshold sweep)
  diag_pacam_miou / _threshold    the same for the PACAM (CPAL runs with context prototypes, SIPE arm)
  diag_pacam_argmax_miou          the PACAM with its own background channel, argmax (background prototype)
  diag_<map>_fg, diag_gt_fg       foreground share of each map's seeds at its best threshold, and the truth's
  diag_cam_ratio, diag_pacam_ratio  mean of each map on its class's pixels / on background
  diag_pacam_above                share of labelled pixels where the PACAM exceeds 0.5
  diag_agreement_l1 / _iou        mean |CAM - PACAM| and IoU of their > 0.5 regions
  diag_embedding_cosine           mean cosine between two pixels of an image (near 1: a flat PACAM)

With CPAL's hook's ``self_image_share`` / ``self_class_share``, ``bce``, ``self``, and the
clustering's ``bank_fill`` / ``context_counts``, a user can see whether CPAL was active and what
it did. ``train.diag_images = 0`` turns the scoring off (the bank's view stays).
"""
from __future__ import annotations

from cpal_ray.data import build_dataset
from cpal_ray.engine.hooks import Hook, MEASURE
from cpal_ray.inference.diagnostics import contrast_report
from cpal_ray.inference.evaluate import evaluate_seeds
from cpal_ray.models import unwrap


class DiagnosticsHook(Hook):
    """See the module docstring. ``images``: training images scored by rank 0 each epoch."""

    priority = MEASURE

    def __init__(self, cfg, images: int):
        self.cfg, self.images = cfg, images
        self._dataset = None

    def dataset(self):
        if self._dataset is None:
            self._dataset = build_dataset(self.cfg.data, "train", train=False)
        return self._dataset

    def after_epoch(self, state, record: dict) -> None:
        if "bank_fill" in record:
            record["classes_below_k"] = [c for c, n in enumerate(record["bank_fill"]) if n < self.cfg.cpal.top_k]
        if state.rank != 0 or self.images <= 0:
            return

        model, ds, cfg = unwrap(state.model), self.dataset(), self.cfg
        context = state.extras.get("context")  # CPALHook's, None before the first clustering
        seeds = evaluate_seeds(model, ds, cfg, device=state.device, context=context, max_images=self.images,
                               scales=(1.0,), flip=False, cam_source="cam")
        for source, res in seeds["sources"].items():  # cam; pacam and pacam_argmax when the model has them
            record[f"diag_{source}_miou"] = res["best_miou"]
            record[f"diag_{source}_threshold"] = res["best_threshold"]
            record[f"diag_{source}_fg"] = res["fg_fraction"]
        record["diag_gt_fg"] = seeds["sources"]["cam"]["gt_fg_fraction"]
        contrast = contrast_report(model, ds, cfg.cpal, context, max_images=self.images, batch_size=1,
                                   device=state.device)
        if "cam" in contrast:
            record["diag_cam_ratio"] = contrast["cam"]["ratio"]
        if "pacam" in contrast:
            record["diag_pacam_ratio"] = contrast["pacam"]["ratio"]
            record["diag_pacam_above"] = contrast["pacam"]["above"]
            record["diag_agreement_l1"] = contrast["cam_vs_pacam"]["l1"]
            record["diag_agreement_iou"] = contrast["cam_vs_pacam"]["iou"]
        record["diag_embedding_cosine"] = contrast["embedding_cosine"]
        model.train()
