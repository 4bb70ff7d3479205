"""Support bank: Fig. 4(b) (length of the per-class support bank) x N_p (clusters per class, Eq. 5).

8 points: bank size in {250, 500, 1000, 2000} x N_p in {25, 50}. The paper fixes 1000 and 50
(Sec. 4.1) and reports in Fig. 4(b) that a longer bank helps, without the numbers. Every point
keeps N_p <= bank size; a base config with top-K above 25 fails the N_p = 25 points (reported as
failed trials, the sweep goes on).
"""


def param_space() -> dict:
    return {"cpal.bank_size": [250, 500, 1000, 2000], "cpal.num_clusters": [25, 50]}
