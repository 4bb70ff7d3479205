"""Tune sweeps: space modules, result tables, a real 2-point sweep, interrupt + restore, no leaks.

The Ray test trains the tiny synthetic config for one epoch of two steps with one Ray Train
worker (0.5 CPU) per trial and evaluates single-scale seeds on 8 val images, so a trial costs
mostly Ray start-up (~30-50 s on 2 cores). A sweep interrupted by `ray job stop` and restored
from a bucket is in the cluster suite (tests/test_cluster.py).
"""
import csv
import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from cpal_ray.config import Config, load_config
from tests.conftest import REPO
from cpal_ray.sweeps.spaces import SPACES, expand, load_space, point_label, point_overrides, required_overrides, space_spec

TINY = "configs/synthetic_tiny.yaml"
FAST = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "train.log_every": 100, "dist.num_workers": 1,
        "dist.cpus_per_worker": 0.5, "data.synthetic_images": 16, "inference.scales": [1.0]}
# Grid sizes the space modules document.
SIZES = {"k_tau": 12, "table1": 5, "table2": 5, "table3": 4, "bank": 8, "table1_center": 6, "photos": 5,
         "photos_table1": 4, "skeleton": 6, "skeleton_variants": 3, "skeleton_regions": 2, "photos_skeleton": 6, "photos_regions": 1}


def dotted(cfg: Config) -> dict:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def bank_actors(ray) -> list:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if str(a["name"]).startswith("cpal-bank-")]


def assert_no_bank_actor(ray, timeout_s=15.0):
    deadline = time.monotonic() + timeout_s
    while bank_actors(ray) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert bank_actors(ray) == []


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path):
    assert Path(path).is_file() and Path(path).stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0


# ------------------------------------------------------------------------------------- spaces


@pytest.mark.unit
def test_every_space_module_is_known_and_sized():
    assert set(SPACES) == set(SIZES)


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(SIZES))
def test_space_loads_and_every_point_is_a_valid_config(name):
    module = load_space(f"tune_spaces.{name}")
    assert load_space(name) is module
    spec = space_spec(module)
    assert "Table" in spec["title"] or "Fig." in spec["title"]  # names what it mirrors
    grid = expand(module.param_space())
    assert len(grid) == SIZES[name]
    assert len({point_label(p) for p in grid}) == len(grid)
    assert set(spec["paper"]) <= {point_label(p) for p in grid}
    for base in (load_config(TINY), Config()):  # tiny test config and the paper's defaults
        base = base.replace(**required_overrides(dotted(base), spec["requires"]))
        for point in grid:
            base.replace(**point_overrides(point, spec["rows"]))  # raises ConfigError if invalid


@pytest.mark.unit
def test_k_tau_is_the_twelve_point_grid_and_raises_clusters():
    space = load_space("k_tau").param_space()
    assert space == {"cpal.top_k": [10, 20, 50], "cpal.tau": [0.05, 0.1, 0.2, 0.3]}
    assert required_overrides(dotted(load_config(TINY)), load_space("k_tau").REQUIRES) == {"cpal.num_clusters": 50}
    assert required_overrides(dotted(Config()), load_space("k_tau").REQUIRES) == {}


@pytest.mark.unit
def test_table1_rows_are_the_agreed_overrides():
    rows = load_space("table1").ROWS
    assert rows["I BCE"]["cpal.enabled"] is False
    for label in ("II +vanilla", "III +proto-aware", "IV +align"):
        assert rows[label]["cpal.self_loss"] is False and rows[label]["inference.cam_source"] == "pacam"
    assert rows["II +vanilla"]["cpal.neighbour_selection"] is False
    assert rows["II +vanilla"]["cpal.positiveness"] is False
    assert rows["III +proto-aware"]["cpal.alignment"] is False and rows["IV +align"]["cpal.alignment"] is True
    v = Config().replace(**rows["V +L_self"])
    assert v == Config()  # row V is the paper's default configuration


@pytest.mark.unit
def test_bad_space_modules_are_rejected():
    with pytest.raises(ValueError, match="no such space"):
        load_space("tune_spaces.nope")
    from cpal_ray.sweeps.spaces import check_space

    with pytest.raises(ValueError, match="non-empty list"):
        check_space(SimpleNamespace(param_space=lambda: {"cpal.tau": 0.1}))
    with pytest.raises(ValueError, match="not in ROWS"):
        check_space(SimpleNamespace(param_space=lambda: {"row": ["a"]}, ROWS={}))


@pytest.mark.unit
def test_param_space_is_a_grid_or_random_one_flag_away():
    from ray import tune

    from cpal_ray.distributed.tune import tune_param_space

    spec = {"space": {"cpal.tau": [0.1, 0.2]}, "seeds": [0, 1, 2], "search": "grid"}
    grid = tune_param_space(spec)
    assert grid["cpal.tau"] == tune.grid_search([0.1, 0.2]) and grid["train.seed"] == tune.grid_search([0, 1, 2])
    rand = tune_param_space({**spec, "search": "random", "seeds": [0]})
    assert rand["cpal.tau"].categories == [0.1, 0.2] and "train.seed" not in rand
    if importlib.util.find_spec("optuna") is None:  # optional extra: a clear message, not a crash
        from cpal_ray.distributed.tune import _search_alg

        with pytest.raises(ImportError, match="pip install optuna"):
            _search_alg({"search": "optuna"})


@pytest.mark.unit
def test_spec_resources_gpus_and_smoke(tmp_path):
    from cpal_ray.config import ConfigError
    from cpal_ray.distributed.tune import build_spec, default_concurrency, trial_resources

    tiny = load_config(TINY, FAST)
    spec = build_spec(tiny, load_space("k_tau"), tmp_path, seeds=3, gpus_per_trial=2, smoke_test=True, max_concurrent=1)
    assert spec["base"]["dist"]["use_gpu"] is True and spec["base"]["dist"]["num_workers"] == 2
    assert spec["resources"]["per_worker"] == {"CPU": 0.5, "GPU": 1} and spec["resources"]["trial"] == {"cpu": 0.01}
    assert spec["raised"] == {"cpal.num_clusters": 50} and spec["base"]["cpal"]["num_clusters"] == 50
    assert len(expand(spec["space"])) == 2 and spec["seeds"] == [0, 1, 2] and spec["base"]["train"]["epochs"] == 1
    with pytest.raises(ConfigError, match="divisible"):  # global batch 8 over 3 GPU workers
        build_spec(tiny, load_space("table3"), tmp_path, gpus_per_trial=3, max_concurrent=1)
    with pytest.raises(ValueError, match="Optuna"):
        build_spec(tiny, load_space("table3"), tmp_path, seeds=2, search="optuna", max_concurrent=1)
    assert default_concurrency(tiny, {"CPU": 2.0}) == 3  # 0.51 CPU per trial on 2 cores
    gpu = tiny.replace(**{"dist.use_gpu": True, "dist.num_workers": 2, "dist.cpus_per_worker": 4.0})
    assert default_concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    # A cluster scaling from zero (a head with 0 CPUs for work, no worker yet) holds no trial: the
    # default must not silently become "one at a time"; it asks, and follows the config when set.
    for scale_from_zero in ({"CPU": 0.0}, {"CPU": 8.0}):
        with pytest.raises(ConfigError, match="dist.max_concurrent_trials"):
            default_concurrency(gpu, scale_from_zero)
    assert default_concurrency(gpu.replace(**{"dist.max_concurrent_trials": 2}), {"CPU": 0.0}) == 2
    assert load_config("configs/voc_resnet50_8gpu.yaml").dist.max_concurrent_trials == 2
    assert trial_resources(tiny.replace(**{"dist.bank_cpus": 0.5}))["cpu"] == pytest.approx(0.51)
    sharded = tiny.replace(**{"dist.bank_cpus": 0.5, "cpal.bank_shards": 2})  # each shard's share
    assert trial_resources(sharded)["cpu"] == pytest.approx(1.01)
    assert default_concurrency(sharded, {"CPU": 2.0}) == 1  # 0.01 + 2 x 0.5 + one 0.5 worker = 1.51 CPU
    assert spec["base"]["train"]["keep_checkpoints"] == 2  # sweeps keep the newest 2 per trial
    kept = build_spec(tiny.replace(**{"train.keep_checkpoints": 5}), load_space("table3"), tmp_path, max_concurrent=1)
    assert kept["base"]["train"]["keep_checkpoints"] == 5
    # Trials run in their own working directory: relative paths that exist here become absolute.
    weights = "cpal_ray/configs/synthetic_tiny.yaml"  # any file that exists relative to the repository
    rel = tiny.replace(**{"model.weights": weights, "data.val_split": "cpal_ray/assets/voc12_meta/val.txt"})
    base = build_spec(rel, load_space("table3"), tmp_path, max_concurrent=1)["base"]
    assert base["model"]["weights"] == str(Path(REPO, weights)) and Path(base["data"]["val_split"]).is_absolute()
    assert base["data"]["train_split"] == "train"


@pytest.mark.unit
def test_trials_are_retried_after_a_lost_node_and_restore_resumes_errored_ones(tmp_path, monkeypatch):
    """A lost node (a spot GPU worker holding the trial's driver and bank) fails the trial: Tune must
    retry it, and `--restore` must resume errored trials, both from the trial's last checkpoint."""
    import ray.tune as tune

    from cpal_ray.distributed import tune as sweeps

    made = {}

    class FakeTuner:
        def __init__(self, trainable, **kwargs):
            made["run"] = kwargs

        @classmethod
        def restore(cls, path, **kwargs):
            made["restore"] = kwargs
            return cls(None)

        @staticmethod
        def can_restore(path, storage_filesystem=None):
            return (Path(path) / "sweep.json").exists()

        def fit(self):
            return "grid"

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    monkeypatch.setattr(sweeps, "_finish", lambda grid, experiment_dir, spec: spec)
    space = SimpleNamespace(__name__="one", __doc__="one point", param_space=lambda: {"cpal.tau": [0.1]})
    spec = sweeps.run_sweep(load_config(TINY, FAST), space, tmp_path / "s", max_concurrent=1)
    failure = made["run"]["run_config"].failure_config
    assert failure.max_failures == sweeps.TRIAL_MAX_FAILURES >= 1 and not failure.fail_fast
    restored = sweeps.restore_sweep(tmp_path / "s")
    assert made["restore"]["resume_errored"] is True and made["restore"]["resume_unfinished"] is True
    assert not made["restore"].get("restart_errored") and restored["retry_errored"] is False
    assert spec["experiment_dir"] == restored["experiment_dir"]


# ------------------------------------------------------------------------------------ results


def fake_result(point, seed, miou=None, error=None, thr=0.3, wall=10.0):
    metrics = {} if miou is None else {"seed_miou": miou, "best_threshold": thr, "wall_seconds": wall,
                                       "phase": "final", "trial_id": f"t{point['cpal.tau']}-{seed}"}
    return SimpleNamespace(config={**point, "train.seed": seed}, metrics=metrics, error=error,
                           path=f"/x/trial_{point['cpal.tau']}_{seed}")


@pytest.mark.unit
def test_final_report_is_found_whatever_order_tune_received_the_rows():
    """A training-progress row may reach Tune after the trial's final report: the final one is
    read from the trial's metrics rows by its tag, never assumed to be the last row."""
    import pandas as pd

    from cpal_ray.sweeps.results import trial_records

    spec = {"space": {"cpal.tau": [0.1]}, "seeds": [0]}
    final = {"seed_miou": 0.42, "best_threshold": 0.3, "wall_seconds": 9.0, "phase": "final", "trial_id": "t1"}
    late_progress = {"seed_miou": float("nan"), "phase": "train", "loss": 0.5, "trial_id": "t1"}
    late = SimpleNamespace(config={"cpal.tau": 0.1}, metrics=late_progress, error=None, path="/x/t1",
                           metrics_dataframe=pd.DataFrame([late_progress, final, late_progress]))
    (record,) = trial_records([late], spec)
    assert record["status"] == "ok" and record["seed_miou"] == 0.42 and record["best_threshold"] == 0.3
    never = SimpleNamespace(config={"cpal.tau": 0.1}, metrics=late_progress, error=None, path="/x/t2",
                            metrics_dataframe=pd.DataFrame([late_progress]))
    assert trial_records([never], spec)[0]["status"] == "unfinished"


@pytest.mark.unit
def test_per_epoch_table_takes_each_epochs_last_row_and_means_over_seeds(tmp_path):
    """The report's per-epoch table: PACAM minus CAM on the diagnostic images and both contrasts,
    mean over seeds; a resumed trial's repeated epoch counts once (its last row); BCE is left out."""
    import pandas as pd

    from cpal_ray.sweeps.results import trial_records, summarise, _epoch_table

    spec = {"space": {"row": ["bce", "cpal"]}, "seeds": [0, 1, 2]}
    final = {"seed_miou": 0.4, "best_threshold": 0.3, "wall_seconds": 1.0, "phase": "final"}

    def trial(row, seed, epochs):
        frame = pd.DataFrame([{"epoch": e, **d} for e, d in epochs] + [final])
        return SimpleNamespace(config={"row": row, "train.seed": seed}, metrics=final, error=None,
                               path=f"/x/{row}{seed}", metrics_dataframe=frame)

    diag = lambda cam, pacam: {"diag_cam_miou": cam, "diag_pacam_miou": pacam, "diag_cam_ratio": 2.0,
                               "diag_pacam_ratio": 1.5}
    grid = [trial("bce", 0, [(0, {"diag_cam_miou": 0.3})]),
            trial("cpal", 0, [(0, diag(0.30, 0.40)), (1, diag(0.30, 0.10)), (1, diag(0.30, 0.20))]),  # resumed at 1
            trial("cpal", 1, [(0, diag(0.40, 0.30)), (1, diag(0.40, 0.40))]),
            trial("cpal", 2, [(0, diag(0.35, 0.35))])]  # stopped after epoch 0
    rows = summarise(trial_records(grid, spec), spec)
    cpal = rows[1]["epochs"]
    assert cpal[0]["diag_pacam_miou"] == pytest.approx(0.35) and cpal[1]["diag_pacam_miou"] == pytest.approx(0.30)
    assert (cpal[0]["seeds"], cpal[1]["seeds"]) == (3, 2)
    lines = _epoch_table(rows)
    assert "| cpal | +0.0 (2.0 / 1.5) | -5.0 (2.0 / 1.5) [2 of 3] |" in lines and not any("bce" in x for x in lines)


@pytest.mark.unit
def test_results_tables_mean_std_errors_and_plots(tmp_path):
    from cpal_ray.sweeps.results import write_results

    spec = {"module": "test", "title": "t", "space": {"cpal.top_k": [2], "cpal.tau": [0.1, 0.2, 0.3]}, "rows": {},
            "paper": {"cpal.top_k=2, cpal.tau=0.1": 50.0}, "seeds": [0, 1], "search": "grid", "raised": {},
            "base": load_config(TINY).to_dict(), "experiment_dir": str(tmp_path)}
    a, b, c = ({"cpal.top_k": 2, "cpal.tau": t} for t in (0.1, 0.2, 0.3))
    grid = [fake_result(a, 0, 0.4), fake_result(a, 1, 0.5), fake_result(b, 0, 0.6), fake_result(b, 1, 0.7, thr=0.5),
            fake_result(c, 0, error=RuntimeError("Traceback...\nConfigError: cpal.tau: must be in (0, 1)")),
            fake_result(c, 1)]  # c/1: interrupted, never reported
    files = write_results(grid, tmp_path, spec)
    rows = {r["cpal.tau"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(rows) == ["0.1", "0.2", "0.3"]
    a_row, b_row = rows["0.1"], rows["0.2"]
    assert (a_row["seed_miou_mean"], a_row["seed_miou_std"], a_row["paper_miou"]) == ("0.4500", "0.0707", "50.0")
    assert (b_row["seed_miou_mean"], b_row["best_threshold"], b_row["seeds_ok"]) == ("0.6500", "0.40", "2")
    assert rows["0.3"]["seeds_ok"] == "0" and rows["0.3"]["errors"] == "ConfigError: cpal.tau: must be in (0, 1)"
    md = (tmp_path / "results.md").read_text()
    assert "65.0 ± 7.1" in md and "Failed trials" in md and "--restore" in md
    assert load_config(files["best_config"]).cpal.tau == 0.2
    assert_png(files["bars"])
    assert_png(files["heatmap"])


# ------------------------------------------------------------------------------------ Ray sweeps


@pytest.mark.ray
def test_two_point_sweep_with_a_failing_point(ray_start_2_cpus, tmp_path):
    from cpal_ray.distributed.tune import restore_sweep, run_sweep

    ray = ray_start_2_cpus
    space = SimpleNamespace(__name__="two_tau", __doc__="Fig. 4(a) in two points, plus an invalid tau.",
                            param_space=lambda: {"cpal.top_k": [2], "cpal.tau": [0.1, 0.2, 1.5]})
    out = run_sweep(load_config(TINY, FAST), space, tmp_path / "two", max_concurrent=2, eval_max_images=8)
    assert out.summary == {"ok": 2, "error": 1, "unfinished": 0, "trials": 3}
    exp = out.experiment_dir.local_path
    rows = read_csv(exp / "results.csv")
    assert [r["cpal.tau"] for r in rows] == ["0.1", "0.2", "1.5"]
    mious = [float(r["seed_miou_mean"]) for r in rows[:2]]
    evaluated = [json.loads((t / "seeds.json").read_text())["seed_miou"]
                 for t in (exp / "trials").iterdir() if (t / "seeds.json").exists()]
    assert sorted(mious) == pytest.approx(sorted(evaluated), abs=1e-4), (rows, evaluated)  # the trials' own numbers
    assert rows[2]["seed_miou_mean"] == "" and "cpal.tau: must be in (0, 1)" in rows[2]["errors"], rows[2]
    md = (exp / "results.md").read_text()
    assert "cpal.top_k=2, cpal.tau=0.1" in md and "Failed trials" in md
    for key in ("bars", "heatmap"):
        assert_png(out.files[key])
    assert load_config(out.files["best_config"]).cpal.tau in (0.1, 0.2)
    for trial in (exp / "trials").iterdir():  # one Ray Train run per trial, named per trial
        if (trial / "seeds.json").exists():
            assert (trial / "final" / "model.pt").is_file()
            assert json.loads((trial / "seeds.json").read_text())["phase"] == "final"
    best = out.result_grid.get_best_result()
    assert best.metrics["seed_miou"] == pytest.approx(max(mious), abs=1e-4)
    assert_no_bank_actor(ray)
    # Restoring a finished sweep runs nothing again: finished trials stay, the failed one stays
    # failed. (An interrupted sweep restored after `ray job stop`: tests/test_cluster.py.)
    stamps = {t.name: (t / "seeds.json").stat().st_mtime_ns for t in (exp / "trials").iterdir()
              if (t / "seeds.json").exists()}
    again = restore_sweep(out.experiment_dir)
    assert again.summary == out.summary
    assert {t.name: (t / "seeds.json").stat().st_mtime_ns for t in (exp / "trials").iterdir()
            if (t / "seeds.json").exists()} == stamps
    assert all((t / "runs.log").read_text().count("start") == 1 for t in (exp / "trials").iterdir()
               if (t / "runs.log").exists())
