"""bench/gpu_check.sh without a GPU: its syntax, the commands it runs, its table and exit status.

The script runs with a stand-in interpreter (``PYTHON=<fake>``) that records every call and
answers like the real steps would, or fails them all, and a stand-in ``nvidia-smi`` whose GPU
memory rises while a stand-in step "uses the GPU". What the GPU itself does is only known when
the script runs on a GPU machine; this checks the script's own logic.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["env", "tests", "train", "bank", "cams", "cpucams", "refine", "predict", "bench"]

# The stand-in: the script's own parsing snippets (-c without a KEY line) go to the real
# interpreter; everything else is answered from FAKE_MODE ("pass" or "fail").
FAKE = r'''
import json, os, sys, time
from pathlib import Path

args = sys.argv[1:]
if args[0] == "-c" and "KEY" not in args[1]:
    os.execv(sys.executable, [sys.executable] + args)
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\n")
mode = os.environ["FAKE_MODE"]
if mode == "fail":
    print("RuntimeError: no CUDA GPUs are available")
    sys.exit(1)


def use_gpu(wanted=True):
    # What nvidia-smi shows while a step holds GPU memory ("nogpu": a GPU-less run of every step).
    if mode == "leaky" and args[:2] == ["-m", "workflows.make_cams"]:
        wanted = True  # actors that asked for no GPU take it anyway (Ray 2.60 leaves it visible)
    if wanted and mode != "nogpu":
        Path(os.environ["FAKE_GPU_MEM"]).write_text("3100")
        time.sleep(1.5)
        Path(os.environ["FAKE_GPU_MEM"]).write_text("100")


over = dict(a.split("=", 1) for a in args[2:] if "=" in a and not a.startswith("-"))
if args[0] == "-c":
    print("KEY NVIDIA H200; torch CUDA 12.6; faiss builds ['faiss-gpu'], faiss GPUs 1")
elif args[:2] == ["-m", "pytest"]:
    use_gpu()
    print("1 passed, 300 deselected in 9.10s")
elif args[:2] == ["-m", "workflows.train"]:
    final = Path(over["train.storage_path"]) / over["train.name"] / "final"
    final.mkdir(parents=True)
    (final / "model.pt").write_bytes(b"")
    device = "gpu" if float(over.get("dist.bank_gpus", 0)) > 0 else "cpu"
    (final / "history.json").write_text(json.dumps([{"epoch": 0, "cluster_device": device, "cluster_seconds": 0.012}]))
    use_gpu()
    print("(RayTrainWorker pid=7) node:7:7 [0] NCCL INFO NCCL version 2.29.3+cuda12.6")
    print(json.dumps({"run_dir": str(final.parent), "final": str(final), "epoch": 0, "loss": 0.693147}))
elif args[:2] == ["-m", "workflows.make_cams"]:
    use_gpu("--gpu" in args)
    n = int(args[args.index("--limit") + 1])
    print(json.dumps({"out_dir": "o", "manifest": "m", "total": n, "done": n, "skipped": 0, "failed": 0,
                      "seconds": 3.2, "failures": []}))
elif args[:2] == ["-m", "workflows.pipeline"]:
    out = Path(args[args.index("--out") + 1])
    final = out / "runs" / (over["train.name"] + "-seg") / "final"
    final.mkdir(parents=True)
    (final / "model.pt").write_bytes(b"")
    use_gpu()
    print(json.dumps({"out": str(out), "pipeline": str(out / "pipeline.json"),
                      "seconds": {"train_cam": 21.0, "crf_seeds": 9.5, "train_affinity": 14.2, "masks": 7.7,
                                  "train_seg": 15.1, "eval_seg": 6.0}}))
elif args[:2] == ["-m", "workflows.predict"]:
    use_gpu()
    n = len(list(Path(args[args.index("--images") + 1]).iterdir()))
    print(json.dumps({"out_dir": "p", "manifest": "m", "total": n, "done": n, "skipped": 0, "failed": 0,
                      "seconds": 2.0, "failures": []}))
elif args[0].endswith("bench_cpal_step.py"):
    use_gpu()
    print("step       median wall s  min-max wall s  median CPU s  images/s")
    print("cam_step          0.0123     0.0120-0.0130        0.0110     325.2")
    print("cpal_step         0.0131     0.0128-0.0140        0.0120     305.3")
    print("ratio cpal_step/cam_step = 1.065 (target <= 1.15, met)")
else:
    sys.exit(3)
'''
NVIDIA_SMI = '#!/bin/sh\ncat "$FAKE_GPU_MEM" 2>/dev/null || echo 100\n'


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n{FAKE}")
    path.chmod(0o755)
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(NVIDIA_SMI)
    smi.chmod(0o755)
    return path


def run_script(tmp_path, fake_python, mode: str, **env_extra) -> tuple[subprocess.CompletedProcess, list]:
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PYTHON": str(fake_python), "OUT": str(tmp_path / "out"), "FAKE_MODE": mode,
           "FAKE_CALLS": str(calls), "FAKE_GPU_MEM": str(tmp_path / "gpu_mem"),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", **env_extra}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    made = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return proc, made


def table_rows(stdout: str) -> dict[str, list[str]]:
    """{step: [device, seconds, status, key figure]} from the script's one table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:4] == ["step", "device", "seconds", "status"])
    rows = {}
    for line in lines[start + 2:]:
        if line.startswith("logs: "):
            break
        parts = line.split(None, 4)
        rows[parts[0]] = parts[1:]
    return rows


def test_script_parses_and_names_its_checks():
    assert shutil.which("bash") and shutil.which("timeout")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for needle in ("set -u", "pytest -m gpu", "dist.use_gpu=true dist.num_workers=1", "dist.bank_gpus=0.25",
                   'cluster_device == "gpu"', "workflows.make_cams", "--no-gpu", "workflows.pipeline",
                   "workflows.predict", "bench_cpal_step.py --device cuda", "PYTHON:-.venv/bin/python", "timeout ",
                   "nvidia-smi", "NO all-reduce"):
        assert needle in text, needle


def test_all_steps_pass_with_a_working_gpu_stand_in(tmp_path, fake_python):
    proc, calls = run_script(tmp_path, fake_python, "pass")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == STEPS
    assert all(r[2] == "PASS" for r in rows.values()), rows
    assert {s: r[0] for s, r in rows.items()} == {**{s: "cuda" for s in STEPS}, "cpucams": "cpu"}
    assert all(float(r[1]) >= 0 for r in rows.values())
    assert "NCCL version 2.29.3+cuda12.6" in rows["train"][3] and "loss 0.6931" in rows["train"][3]
    assert "no all-reduce" in rows["train"][3]  # one worker: no DDP, said in the table itself
    assert rows["bank"][3].startswith("cluster_device=gpu, k-means 0.012s")
    assert rows["cams"][3].startswith("16/16 CAM files, 0 failed")
    assert rows["cpucams"][3].startswith("4/4 CAM files") and "left the GPU alone" in rows["cpucams"][3]
    assert "train_affinity 14s" in rows["refine"][3] and "masks 8s" in rows["refine"][3]
    assert "train_seg 15s" in rows["refine"][3]
    assert rows["predict"][3].startswith("4/4 PNGs, 0 failed")
    assert "cam_step 0.0123 s, cpal_step 0.0131 s" in rows["bench"][3] and "met" in rows["bench"][3]
    assert (tmp_path / "out" / "gpu_check" / "summary.txt").is_file()
    assert {p.name for p in (tmp_path / "out" / "gpu_check").glob("*.log")} == {f"{s}.log" for s in STEPS}

    # The commands themselves.
    by_kind = {}
    for argv in calls:
        by_kind.setdefault(argv[1] if argv[0] == "-m" else Path(argv[0]).name, []).append(argv)
    assert by_kind["pytest"][0][:4] == ["-m", "pytest", "-q", "-m"] and by_kind["pytest"][0][4] == "gpu"
    train, bank = by_kind["workflows.train"]
    for argv in (train, bank):
        assert {"--config", "configs/synthetic_tiny.yaml", "train.epochs=1", "dist.num_workers=1"} <= set(argv)
    assert {"dist.use_gpu=true", "train.max_steps_per_epoch=4"} <= set(train)
    assert {"dist.use_gpu=false", "dist.bank_gpus=0.25"} <= set(bank)
    cams, cpu_cams = by_kind["workflows.make_cams"]
    assert cams[cams.index("--checkpoint") + 1].endswith("gpu-train/final")
    assert "--gpu" in cams and cams[cams.index("--actors-per-gpu") + 1] == "2"
    assert "--no-gpu" in cpu_cams and "--gpu" not in cpu_cams
    pipeline = by_kind["workflows.pipeline"][0]
    assert {"dist.use_gpu=true", "inference.actor_gpus=1", "affinity.actor_gpus=1", "seg.actor_gpus=1",
            "affinity.epochs=1", "seg.epochs=1"} <= set(pipeline)
    predict = by_kind["workflows.predict"][0]
    assert predict[predict.index("--checkpoint") + 1].endswith("runs/gpu-refine-seg/final")
    assert by_kind["bench_cpal_step.py"][0][1:] == ["--device", "cuda"]


def test_a_step_that_did_not_use_the_gpu_fails(tmp_path, fake_python):
    """Every step succeeds, but the GPU's memory never rises: the GPU steps fail on that alone."""
    proc, _ = run_script(tmp_path, fake_python, "nogpu")
    assert proc.returncode == 1
    rows = table_rows(proc.stdout)
    assert {s: r[2] for s, r in rows.items()} == {**{s: "FAIL" for s in STEPS}, "env": "PASS", "cpucams": "PASS"}
    assert "ran without using the GPU" in rows["cams"][3] and rows["cams"][0] == "cpu"


def test_cpu_actors_that_take_the_gpu_fail(tmp_path, fake_python):
    """make_cams --no-gpu whose actors load their model onto the GPU anyway (issue 25, item 3)."""
    proc, _ = run_script(tmp_path, fake_python, "leaky")
    rows = table_rows(proc.stdout)
    assert rows["cpucams"][:1] == ["cuda"] and rows["cpucams"][2] == "FAIL"
    assert "must not use it" in rows["cpucams"][3] and proc.returncode == 1


def test_failures_are_reported_and_every_step_still_runs(tmp_path, fake_python):
    proc, calls = run_script(tmp_path, fake_python, "fail")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == STEPS
    assert [rows[s][2] for s in STEPS] == ["FAIL", "FAIL", "FAIL", "FAIL", "SKIP", "SKIP", "FAIL", "SKIP", "FAIL"]
    assert "no checkpoint" in rows["cams"][3] and "no segmenter" in rows["predict"][3]
    assert "exit 1" in rows["bench"][3]
    assert len(calls) == 6  # env, tests, train, bank, refine, bench: the CAM and predict steps had nothing to load


def test_a_spent_budget_skips_the_remaining_steps(tmp_path, fake_python):
    proc, _ = run_script(tmp_path, fake_python, "pass", GPU_CHECK_BUDGET_S="10")
    assert proc.returncode == 1
    rows = table_rows(proc.stdout)
    assert {r[2] for r in rows.values()} == {"SKIP"}, rows


def test_missing_interpreter_exits_2(tmp_path):
    env = {**os.environ, "PYTHON": str(tmp_path / "nope"), "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no Python interpreter" in proc.stderr
