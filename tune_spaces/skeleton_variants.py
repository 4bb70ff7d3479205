"""Table 1's row V variants on the SIPE skeleton: the PACAM's max-normalisation, which map L_self
moves and SIPE's seed regions (``cpal.pacam_normalize``, ``cpal.self_grad``, ``cpal.region``),
beside ``tune_spaces.skeleton``.

  CPAL, head + normalised PACAM          today's head with each PACAM channel divided by its max
  CPAL, SIPE skeleton, self_grad cam     L_self moves only the CAM: the PACAM is a target
  CPAL, SIPE skeleton, self_grad pacam   L_self moves only the PACAM: the CAM is the target
  SIPE arm, SIPE regions                 the SIPE arm with SIPE's seed regions in place of M > tau
  CPAL, SIPE skeleton, SIPE regions      the same regions for CPAL's instance prototypes
"""
from tune_spaces.skeleton import SIPE_SKELETON

ROWS = {
    "CPAL, head + normalised PACAM": {"cpal.pacam_normalize": True},
    "CPAL, SIPE skeleton, self_grad cam": {**SIPE_SKELETON, "cpal.self_grad": "cam"},
    "CPAL, SIPE skeleton, self_grad pacam": {**SIPE_SKELETON, "cpal.self_grad": "pacam"},
    "SIPE arm, SIPE regions": {**SIPE_SKELETON, "cpal.context": "instance", "cpal.region": "sipe"},
    "CPAL, SIPE skeleton, SIPE regions": {**SIPE_SKELETON, "cpal.region": "sipe"},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
