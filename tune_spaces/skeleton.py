"""Table 1 on the skeleton CPAL was built on: SIPE's prototype space and background prototype, the
SIPE arm, and which map L_self moves (every row scores the CAM *and* the PACAM).

Arms, same data, budget and seeds (run with ``--eval-split train``: seeds scored on the training
images). "SIPE skeleton" = SIPE's hierarchical embedding (``model.embedding=hierarchical``), a
background prototype (``cpal.background=prototype``), max-normalised PACAM channels
(``cpal.pacam_normalize``) and no centring (SIPE centres nothing):

  I BCE                        the plain CAM
  SIPE arm                     the SIPE skeleton with each image's own prototypes (IS-CAM, no bank)
  CPAL, head (today)           the defaults: MLP head, centred, PACAM background 1 - max
  CPAL, SIPE skeleton          context prototypes on the SIPE skeleton, L_self moves both maps
  IV head / IV SIPE skeleton   Table 1 row IV: the bank and the PACAM without L_self, so the CAM is
                               row I's and the PACAM is what L_self would pull it toward

The first question each table answers: is the PACAM above the CAM it teaches (rows IV)? The
variants (PACAM normalisation, which map L_self moves) are ``tune_spaces.skeleton_variants``, SIPE's
seed regions ``tune_spaces.skeleton_regions``.
"""

SIPE_SKELETON = {"model.embedding": "hierarchical", "cpal.background": "prototype", "cpal.pacam_normalize": True,
         "cpal.center": "none"}

ROWS = {
    "I BCE": {"cpal.enabled": False},
    "SIPE arm (own prototypes)": {**SIPE_SKELETON, "cpal.context": "instance"},
    "CPAL, head (today)": {},
    "CPAL, SIPE skeleton": dict(SIPE_SKELETON),
    "IV (no L_self), head": {"cpal.self_loss": False},
    "IV (no L_self), SIPE skeleton": {**SIPE_SKELETON, "cpal.self_loss": False},
}
# VOC 2012 train, ResNet-50, seed mIoU (%): CPAL's Table 1 and SIPE's paper (its IS-CAM seeds).
PAPER = {"I BCE": 50.1, "SIPE arm (own prototypes)": 58.6, "CPAL, head (today)": 62.5, "CPAL, SIPE skeleton": 62.5,
         "IV (no L_self), head": 56.8, "IV (no L_self), SIPE skeleton": 56.8}


def param_space() -> dict:
    return {"row": list(ROWS)}
