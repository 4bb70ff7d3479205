"""A real Ray Train resume past a damaged checkpoint (issue 24): the last registered checkpoint
has one flipped bit in ``model.pt``; the run started again with more epochs resumes from the
newest checkpoint that verifies, trains the new epochs and exports a final/ that verifies."""
import json

import pytest

from cpal_ray.config import load_config
from cpal_ray.engine import load_checkpoint
from tests.test_no_silent_loss import flip_bit

pytestmark = pytest.mark.ray


def test_a_bit_flipped_registered_checkpoint_is_skipped_for_the_newest_that_verifies(ray_start_2_cpus, tmp_path):
    from cpal_ray.distributed.trainer import run_training

    cfg = load_config("configs/synthetic_tiny.yaml", {
        "train.storage_path": str(tmp_path), "train.name": "flip", "train.epochs": 2, "train.log_every": 100,
        "train.max_steps_per_epoch": 2, "dist.num_workers": 1, "data.synthetic_images": 16,
        "cpal.warmup_cluster_steps": 0})
    run_training(cfg)
    run = tmp_path / "flip"
    ckpts = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert [load_checkpoint(p)["epoch"] for p in ckpts] == [1, 2]
    flip_bit(ckpts[-1] / "model.pt")  # the checkpoint Ray Train hands out on the restart
    res = run_training(cfg.replace(**{"train.epochs": 3}))
    records = {r["epoch"]: r for r in json.loads((run / "history.json").read_text())}
    assert sorted(records) == [0, 1, 2]
    assert records[1]["start_epoch"] == 1  # resumed after epoch 0: the damaged epoch-1 weights were not used
    final = load_checkpoint(res.final_dir)  # verifies every file
    assert final["epoch"] == 3 and final["config"].train.epochs == 3
    assert final["scheduler"]["total_iters"] == 3 * 2  # the schedule spread over the new total
