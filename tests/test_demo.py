"""The README's first command, in miniature: the demo end to end (both arms through the whole
pipeline on Ray: CAM training, seeds, CRF seeds, affinity network, masks, segmenter; figures,
report) on the synthetic config with the smallest budget."""
import json

import pytest

from cpal_ray.config import load_config

pytestmark = pytest.mark.ray


def test_demo_writes_the_report_with_both_runs_and_the_diagnostics(ray_start_2_cpus, tmp_path):
    from cpal_ray.pipeline.baseline_vs_cpal import run_demo

    cfg = load_config("configs/synthetic_tiny.yaml", {
        "train.epochs": 2, "train.max_steps_per_epoch": 2, "train.diag_images": 4, "data.synthetic_images": 8,
        "dist.num_workers": 1, "dist.cpus_per_worker": 0.5, "inference.scales": [1.0], "inference.actor_cpus": 0.5,
        "pseudo.max_actors": 1, "train.log_every": 100, "affinity.epochs": 1, "affinity.batch_size": 4,
        "affinity.crop_size": 64, "affinity.actor_cpus": 0.5, "affinity.exp_times": 3, "seg.epochs": 1,
        "seg.batch_size": 4, "seg.crop_size": 64, "seg.actor_cpus": 0.5})
    out = run_demo(cfg, tmp_path / "demo", grid_images=2, say=lambda *a: None)
    report = (tmp_path / "demo" / "report.md").read_text()
    assert set(out["runs"]) == {"baseline", "cpal"} and "Verdict" in report
    for fig in ("val_grid.png", "bank_pca.png", "iou_bars.png", "miou_curves.png", "diagnostics.png"):
        assert (tmp_path / "demo" / "figures" / fig).stat().st_size > 0, fig
        assert f"figures/{fig}" in report
    cpal_history = json.loads((out["runs"]["cpal"]["final"] / "history.json").read_text())
    assert [h["epoch"] for h in cpal_history] == [0, 1] and "diag_pacam_miou" in cpal_history[-1]
    assert out["runs"]["cpal"]["pseudo_train"]["images"] == 8
    for run in out["runs"].values():
        assert run["masks_train"]["images"] == 8 and run["seg_val"]["images"] == 8
        assert 0.0 <= run["seg_val"]["miou"] <= 1.0
    assert "segmenter val mIoU" in report and "pseudo-mask mIoU" in report
