"""Top-K x tau: Table 2 (third block, K = 10 / 20 / 50) crossed with Fig. 4(a) (tau of Eq. 4).

12 points: K in {10, 20, 50} (soft positive neighbours kept, Eq. 6) x tau in {0.05, 0.1, 0.2, 0.3}
(the CAM threshold of the instance prototypes, Eq. 4). The paper reports K at tau = 0.1 only.
K = 50 needs N_p >= 50 clusters per class, so the driver raises ``cpal.num_clusters`` (and the
bank, which must hold at least N_p entries) to 50 when the base config is smaller, e.g. the tiny
test config; the paper config (N_p = 50, bank 1000) is unchanged.
"""

REQUIRES = {"cpal.num_clusters": 50, "cpal.bank_size": 50}
# Table 2 (VOC 2012 train, seed mIoU %), tau = 0.1 as in Sec. 4.1.
PAPER = {"cpal.top_k=10, cpal.tau=0.1": 61.3, "cpal.top_k=20, cpal.tau=0.1": 62.5, "cpal.top_k=50, cpal.tau=0.1": 60.1}


def param_space() -> dict:
    return {"cpal.top_k": [10, 20, 50], "cpal.tau": [0.05, 0.1, 0.2, 0.3]}
