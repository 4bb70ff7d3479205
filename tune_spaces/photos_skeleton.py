"""Table 1's skeleton arms (``tune_spaces.skeleton``) on the bundled photos at 10 epochs.

The same arms (BCE, the SIPE arm, CPAL on today's head and on the SIPE skeleton, Table 1 row IV on
both skeletons) with the 10-epoch budget of ``tune_spaces.photos`` (EfficientNet-Lite0, one
training worker; run with ``--eval-split train``). Every row scores the CAM and the PACAM.
"""
from tune_spaces.skeleton import PAPER as _PAPER, ROWS as _ROWS

_KEEP = ("I BCE", "SIPE arm (own prototypes)", "CPAL, head (today)", "CPAL, SIPE skeleton",
         "IV (no L_self), head", "IV (no L_self), SIPE skeleton")
ROWS = {f"{label}, 10 ep": {**_ROWS[label], "train.epochs": 10} for label in _KEEP}
PAPER = {f"{label}, 10 ep": _PAPER[label] for label in _KEEP if label in _PAPER}


def param_space() -> dict:
    return {"row": list(ROWS)}
