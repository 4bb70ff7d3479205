"""Table 2: neighbour selection, positiveness and the number of neighbours K.

5 rows. The paper's table has 6 lines but its first (neighbours, positiveness, K = 20) and fifth
(K = 20) are the same configuration, run once here as "K=20 (full)". "No neighbours" = all N_p
context prototypes (no top-K), "no positiveness" = uniform weights 1/K (the literal Eq. 13).
K = 50 needs N_p >= 50: the driver raises ``cpal.num_clusters`` / ``cpal.bank_size`` to 50 when
the base config is smaller (see ``REQUIRES``).
"""

REQUIRES = {"cpal.num_clusters": 50, "cpal.bank_size": 50}


def _row(neighbours: bool, positiveness: bool, top_k: int | None = None) -> dict:
    row = {"cpal.neighbour_selection": neighbours, "cpal.positiveness": positiveness}
    if top_k is not None:
        row["cpal.top_k"] = top_k
    return row


ROWS = {
    "K=20 (full)": _row(True, True, 20),
    "no neighbours, no positiveness": _row(False, False),
    "no positiveness": _row(True, False, 20),
    "K=10": _row(True, True, 10),
    "K=50": _row(True, True, 50),
}
# VOC 2012 train, ResNet-50, seed mIoU (%).
PAPER = {"K=20 (full)": 62.5, "no neighbours, no positiveness": 59.2, "no positiveness": 60.3, "K=10": 61.3,
         "K=50": 60.1}


def param_space() -> dict:
    return {"row": list(ROWS)}
