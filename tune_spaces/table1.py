"""Table 1: ablation of the components (I BCE, II vanilla context, III prototype-aware, IV alignment, V L_self).

5 rows. Rows II-IV train without L_self, so the classifier CAM is the BCE baseline's; what they
change is the prototype-aware CAM (PACAM, Eq. 13), so their seeds come from the PACAM
(``inference.cam_source=pacam``). Row V is the full method, seeds from the CAM as in the paper.
"Vanilla" = context prototypes from the bank, all N_p of them, uniform weights, no alignment.
"""

_CPAL_OFF = {"cpal.enabled": False, "inference.cam_source": "cam"}


def _cpal(neighbours: bool, positiveness: bool, alignment: bool, self_loss: bool, cam_source: str) -> dict:
    return {"cpal.enabled": True, "cpal.neighbour_selection": neighbours, "cpal.positiveness": positiveness,
            "cpal.alignment": alignment, "cpal.self_loss": self_loss, "inference.cam_source": cam_source}


ROWS = {
    "I BCE": _CPAL_OFF,
    "II +vanilla": _cpal(False, False, False, False, "pacam"),
    "III +proto-aware": _cpal(True, True, False, False, "pacam"),
    "IV +align": _cpal(True, True, True, False, "pacam"),
    "V +L_self": _cpal(True, True, True, True, "cam"),
}
# VOC 2012 train, ResNet-50, seed mIoU (%).
PAPER = {"I BCE": 50.1, "II +vanilla": 51.2, "III +proto-aware": 54.5, "IV +align": 56.8, "V +L_self": 62.5}


def param_space() -> dict:
    return {"row": list(ROWS)}
