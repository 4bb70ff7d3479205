"""Table 1's SIPE arm and CPAL on the SIPE skeleton, instance prototypes over SIPE's seed regions.

Beside ``tune_spaces.skeleton``: SIPE's seed regions in place of M_n > tau for the instance
prototypes (``cpal.region=sipe``).

  SIPE arm, SIPE regions                 the SIPE arm with SIPE's seed regions
  CPAL, SIPE skeleton, SIPE regions      the same regions for CPAL's instance prototypes
"""
from tune_spaces.skeleton import SIPE_SKELETON

ROWS = {
    "SIPE arm, SIPE regions": {**SIPE_SKELETON, "cpal.context": "instance", "cpal.region": "sipe"},
    "CPAL, SIPE skeleton, SIPE regions": {**SIPE_SKELETON, "cpal.region": "sipe"},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
