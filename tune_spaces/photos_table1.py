"""Table 1's ablation rows II-IV on the bundled photos at 10 epochs, and CPAL with a stronger L_self.

Completes the photos' Table 1: rows I (BCE) and V (full CPAL) at 10 epochs are in
``tune_spaces.photos``; this space adds II (+ vanilla context prototypes), III (+ prototype-aware
weights) and IV (+ alignment), which train without L_self and take their seeds from the PACAM as
in ``tune_spaces.table1``, and one regime point: the full method with lambda_self = 4 (L_self
measured 0.013 against BCE's 0.106 at lambda_self = 1, so CPAL barely acted). Same data,
backbone, learning rates and steps as every 10-epoch arm of ``tune_spaces.photos``; run with
``--eval-split train`` (seeds scored on the training photos, the WSSS protocol).
"""
from tune_spaces.table1 import ROWS as TABLE1_ROWS

_TEN = {"train.epochs": 10}

ROWS = {
    "II +vanilla, 10 ep": {**TABLE1_ROWS["II +vanilla"], **_TEN},
    "III +proto-aware, 10 ep": {**TABLE1_ROWS["III +proto-aware"], **_TEN},
    "IV +align, 10 ep": {**TABLE1_ROWS["IV +align"], **_TEN},
    "V lambda_self 4, 10 ep": {**TABLE1_ROWS["V +L_self"], "cpal.lambda_self": 4.0, **_TEN},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
