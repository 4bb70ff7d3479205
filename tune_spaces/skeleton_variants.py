"""Table 1's row V variants: the PACAM normalised on the head, L_self moving one map only.

Beside ``tune_spaces.skeleton``: the PACAM's max-normalisation on today's head, and which map
L_self moves on the SIPE skeleton (``cpal.pacam_normalize``, ``cpal.self_grad``; issue 28's items
4 and 5). The third ``self_grad`` value, ``both``, is ``skeleton``'s "CPAL, SIPE
skeleton" row; SIPE's seed regions are ``tune_spaces.skeleton_regions``.

  CPAL, head + normalised PACAM          today's head with each PACAM channel divided by its max
  CPAL, SIPE skeleton, self_grad cam     L_self moves only the CAM: the PACAM is a target
  CPAL, SIPE skeleton, self_grad pacam   L_self moves only the PACAM: the CAM is the target
"""
from tune_spaces.skeleton import SIPE_SKELETON

ROWS = {
    "CPAL, head + normalised PACAM": {"cpal.pacam_normalize": True},
    "CPAL, SIPE skeleton, self_grad cam": {**SIPE_SKELETON, "cpal.self_grad": "cam"},
    "CPAL, SIPE skeleton, self_grad pacam": {**SIPE_SKELETON, "cpal.self_grad": "pacam"},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
