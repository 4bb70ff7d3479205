"""Table 1's rows I (BCE) and V (full CPAL) on the bundled photos, at two training budgets.

For the README's 3-seed table on the 97 training photos (the WSSS protocol: seeds scored on the
training images; run with ``--eval-split train``): the demo's budget (5 epochs) and twice it
(10 epochs, so the CAM has trained before L_self acts and the bank holds more instances), each
with the BCE baseline and CPAL, and at 10 epochs CPAL with tau = 0.3 (fewer background pixels in
the instance prototypes, the contamination the diagnostics measured). Same data, backbone,
learning rates and steps for every arm of a budget.
"""

ROWS = {
    "BCE, 5 ep": {"cpal.enabled": False, "train.epochs": 5},
    "CPAL, 5 ep": {"cpal.enabled": True, "train.epochs": 5},
    "BCE, 10 ep": {"cpal.enabled": False, "train.epochs": 10},
    "CPAL, 10 ep": {"cpal.enabled": True, "train.epochs": 10},
    "CPAL tau 0.3, 10 ep": {"cpal.enabled": True, "train.epochs": 10, "cpal.tau": 0.3},
}


def param_space() -> dict:
    return {"row": list(ROWS)}
