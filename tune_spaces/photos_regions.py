"""Table 1's SIPE arm with SIPE's seed regions on the bundled photos at 10 epochs.

The one arm of ``tune_spaces.skeleton_regions`` that lifted the CAM on the attribute benchmark,
with the 10-epoch budget of ``tune_spaces.photos_skeleton`` (EfficientNet-Lite0, one training
worker; run with ``--eval-split train``), to be read beside that sweep's BCE row.
"""
from tune_spaces.skeleton_regions import ROWS as _ROWS

_LABEL = "SIPE arm, SIPE regions"
ROWS = {f"{_LABEL}, 10 ep": {**_ROWS[_LABEL], "train.epochs": 10}}


def param_space() -> dict:
    return {"row": list(ROWS)}
