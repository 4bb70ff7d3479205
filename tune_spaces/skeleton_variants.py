"""Table 1's row V variants on the SIPE skeleton: the PACAM's max-normalisation and which map
L_self moves (``cpal.pacam_normalize``, ``cpal.self_grad``), beside ``tune_spaces.skeleton``.

  CPAL, head + normalised PACAM          today's head with each PACAM channel divided by its max
  CPAL, SIPE skeleton, unnormalised      the SIPE skeleton with the literal Eq. 13 (no max division)
  CPAL, SIPE skeleton, self_grad cam     L_self moves only the CAM: the PACAM is a target
  CPAL, SIPE skeleton, self_grad pacam   L_self moves only the PACAM: the CAM is the target
"""
from tune_spaces.skeleton import SIPE_SKELETON

ROWS = {
    "CPAL, head + normalised PACAM": {"cpal.pacam_normalize": True},
    "CPAL, SIPE skeleton, unnormalised": {**SIPE_SKELETON, "cpal.pacam_normalize": False},
    "CPAL, SIPE skeleton, self_grad cam": {**SIPE_SKELETON, "cpal.self_grad": "cam"},
    "CPAL, SIPE skeleton, self_grad pacam": {**SIPE_SKELETON, "cpal.self_grad": "pacam"},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
