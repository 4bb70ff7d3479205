#!/usr/bin/env bash
# GPU readiness check: the project's GPU paths on a machine with one CUDA GPU, in under 8 minutes.
#
# Run it from the repository root after installing the CUDA 12 line (docs/install.md):
#   python3.11 -m venv .venv
#   .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126
#   .venv/bin/pip install -e '.[gpu,dev]'
#   bash bench/gpu_check.sh
#
# It installs nothing (a lent GPU machine may have no network) and runs everything with $PYTHON,
# default .venv/bin/python. Steps, each under its own time limit inside a total budget
# ($GPU_CHECK_BUDGET_S, default 470 s), the later ones going on after an earlier one failed:
#   env      torch / CUDA / faiss as this interpreter sees them (faiss-gpu alone, CUDA 12, GPUs visible)
#   tests    pytest -m gpu: the GPU-marked tests, none of them skipped
#   train    a 1-worker nccl Ray Train run of configs/synthetic_tiny.yaml, 4 steps. With one worker
#            prepare_model does not wrap the model in DDP, so NO all-reduce runs here (and NCCL
#            refuses two ranks on one GPU): gradient all-reduce is only shown by a run on 2+ GPUs.
#   bank     faiss-gpu k-means in the bank actor holding dist.bank_gpus=0.25: the run's
#            final/history.json must say cluster_device == "gpu". Its training worker runs on the
#            CPU: next to a worker holding the whole GPU, 0.25 more would never be granted.
#   cams     GPU CAM actors: workflows.make_cams --gpu --actors-per-gpu 2 on the train run's final/
#            checkpoint; the GPU's memory must rise while it runs (the actors really use CUDA).
#   cpucams  the same with --no-gpu: the GPU's memory must NOT rise (actors that asked for no GPU
#            stay off it, though Ray 2.60 leaves the GPU visible to them).
#   refine   workflows.pipeline on the GPU: CAM training, CRF seeds, train_affinity, make_masks,
#            train_seg, eval_seg (one epoch each, the synthetic set); per-stage seconds.
#   predict  workflows.predict with the refine run's segmenter on 4 photos (GPU actors).
#   bench    bench/bench_cpal_step.py --device cuda: absolute times of the CAM and CPAL steps
# Then one table: step, device (cuda when the GPU's memory rose by >= 200 MiB during the step, as
# nvidia-smi reports it; cpu otherwise), seconds, PASS/FAIL/SKIP, key figure. Logs: $OUT/gpu_check/
# when $OUT is set, else a temporary folder (printed). Runs and CAM files go to a temporary
# folder, removed at the end unless KEEP_WORK=1. Exit status: 0 only when every step passed,
# else 1 (2: no Python).
set -u

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-.venv/bin/python}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no Python interpreter at '$PY' (install the project first, or set PYTHON=...)" >&2
  exit 2
fi
BUDGET=${GPU_CHECK_BUDGET_S:-470}
LOGS=${OUT:+$OUT/gpu_check}
LOGS=${LOGS:-$(mktemp -d -t gpu_check_logs.XXXXXX)}
mkdir -p "$LOGS"
WORK=$(mktemp -d -t gpu_check_work.XXXXXX)
RUNS=$WORK/runs
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset RAY_ADDRESS   # every workflow starts its own local Ray, never joins another cluster
echo "gpu_check: python $PY, logs in $LOGS, work in $WORK, budget ${BUDGET}s"

START=$(date +%s)
NAMES=() STATUSES=() TIMES=() KEYS=() DEVICES=()
DEVICE=-

record() {  # record STEP STATUS SECONDS KEY: one row of the table, with the step's $DEVICE
  NAMES+=("$1"); STATUSES+=("$2"); TIMES+=("$3"); KEYS+=("$4"); DEVICES+=("$DEVICE")
  echo "-> $1: $2 on $DEVICE (${3}s) $4"
}

gpu_mem() {  # MiB used on GPU 0, empty without nvidia-smi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9
}

limit_for() {  # limit_for CAP: seconds the next step may take, within what is left of the budget
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < $1 )); then echo "$left"; else echo "$1"; fi
}

run() {  # run STEP CAP CMD...: run CMD under its limit, output to $LOGS/STEP.log; sets RC, SECS
  local step=$1 cap=$2 limit t0
  shift 2
  limit=$(limit_for "$cap")
  if (( limit < 20 )); then
    echo "budget of ${BUDGET}s spent before this step" > "$LOGS/$step.log"
    RC=-1 SECS=0 DEVICE=-
    return
  fi
  local shown=${*//$'\n'/ } base sampler
  echo "== $step (limit ${limit}s): ${shown:0:160}" | tee "$LOGS/$step.log"
  # The GPU's memory, sampled twice a second while the step runs: where the step's work ran.
  base=$(gpu_mem)
  : > "$LOGS/$step.gpu"
  if [ -n "$base" ]; then
    (while :; do gpu_mem >> "$LOGS/$step.gpu"; echo >> "$LOGS/$step.gpu"; sleep 0.5; done) &
    sampler=$!
  fi
  t0=$(date +%s.%N)
  timeout --kill-after=15 "$limit" "$@" >> "$LOGS/$step.log" 2>&1
  RC=$?
  SECS=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [ -n "$base" ]; then
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    DEVICE=$(awk -v b="$base" '$1 != "" && $1 - b >= 200 { up = 1 } END { print up ? "cuda" : "cpu" }' "$LOGS/$step.gpu")
  else
    DEVICE="?"  # no nvidia-smi: where the step ran is unknown
  fi
  if (( RC == 124 || RC == 137 )); then echo "== $step: timed out after ${limit}s" >> "$LOGS/$step.log"; fi
}

failed() {  # failed STEP: the FAIL/SKIP row of a step whose command did not succeed
  if (( RC == -1 )); then record "$1" SKIP 0 "time budget spent"
  elif (( RC == 124 || RC == 137 )); then record "$1" FAIL "$SECS" "timed out, see $LOGS/$1.log"
  else record "$1" FAIL "$SECS" "exit $RC, see $LOGS/$1.log: $(grep -v '^\s*$' "$LOGS/$1.log" | tail -n 1 | cut -c1-80)"
  fi
}

# ------------------------------------------------------------------------------------- env
ENV_PY='
import importlib.metadata as md
import sys

import torch

names = {(d.metadata["Name"] or "").lower() for d in md.distributions()}
builds = sorted(n for n in names if n == "faiss" or n.startswith("faiss-"))
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if cuda else "no GPU visible to torch"
import faiss

gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
print(f"torch {torch.__version__} CUDA {torch.version.cuda}, faiss {faiss.__version__} ({builds})")
print(f"KEY {name}; torch CUDA {torch.version.cuda}; faiss builds {builds}, faiss GPUs {gpus}")
# One CUDA line: a CUDA 12 torch next to faiss-gpu (CUDA 12, the gpu extra), alone.
one_line = (torch.version.cuda or "").startswith("12.") and builds == ["faiss-gpu"]
sys.exit(0 if cuda and gpus > 0 and one_line else 1)
'
run env 60 "$PY" -c "$ENV_PY"
KEY=$(grep '^KEY ' "$LOGS/env.log" | tail -n 1 | cut -c5-)
if (( RC == 0 )); then DEVICE=cuda; else DEVICE=-; fi  # env creates no CUDA context: its own verdict
if (( RC == 0 )); then record env PASS "$SECS" "$KEY"
elif [ -n "$KEY" ]; then record env FAIL "$SECS" "$KEY"
else failed env
fi

on_gpu() {  # on_gpu STEP PASS-KEY: the row of a step that succeeded and had to use the GPU
  if [ "$DEVICE" = cuda ]; then record "$1" PASS "$SECS" "$2"
  elif [ "$DEVICE" = "?" ]; then record "$1" FAIL "$SECS" "no nvidia-smi: cannot tell whether it used the GPU; $2"
  else record "$1" FAIL "$SECS" "ran without using the GPU (its memory did not rise); $2"
  fi
}

# ------------------------------------------------------------------------------------ tests
run tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider
SUMMARY=$(grep -E '[0-9]+ (passed|failed|error|skipped)|no tests ran' "$LOGS/tests.log" | tail -n 1 | sed 's/=//g; s/^ *//')
if (( RC == 0 )) && [[ $SUMMARY == *passed* && $SUMMARY != *skipped* ]]; then on_gpu tests "$SUMMARY"
elif (( RC == 0 || RC == 1 || RC == 5 )) && [ -n "$SUMMARY" ]; then record tests FAIL "$SECS" "$SUMMARY"
else failed tests
fi

# ------------------------------------------------------------------------------------ train
# Ray Train picks the nccl backend for workers that hold a GPU (gloo otherwise); NCCL_DEBUG=INFO
# makes NCCL print its version (and CUDA build) when the process group starts, which the key
# figure shows when the worker's output reaches the driver's log. One worker: no DDP, so no
# all-reduce (see the header).
TRAIN=(--config configs/synthetic_tiny.yaml train.epochs=1 "train.storage_path=$RUNS")
run train 90 env NCCL_DEBUG=INFO "$PY" -m workflows.train "${TRAIN[@]}" train.name=gpu-train \
  train.max_steps_per_epoch=4 dist.use_gpu=true dist.num_workers=1
NCCL=$(grep -o 'NCCL version [^ ]*' "$LOGS/train.log" | head -n 1)
LOSS=$(grep '^{"run_dir"' "$LOGS/train.log" | tail -n 1 |
  "$PY" -c 'import json, sys; print("%.4g" % json.load(sys.stdin)["loss"])' 2>/dev/null)
if (( RC == 0 )) && [ -f "$RUNS/gpu-train/final/model.pt" ]; then
  on_gpu train "loss ${LOSS:-?} after 4 steps; ${NCCL:-no NCCL line in the driver log}; 1 worker: no all-reduce"
elif (( RC == 0 )); then
  record train FAIL "$SECS" "finished without final/model.pt"
else failed train
fi

# ------------------------------------------------------------------------------------- bank
# 8 steps of 8 images: the whole 64-image set, so every class holds more entries than the 8
# clusters and faiss really runs (with fewer, the bank copies the entries and reports "none").
run bank 90 "$PY" -m workflows.train "${TRAIN[@]}" train.name=gpu-bank \
  train.max_steps_per_epoch=8 dist.use_gpu=false dist.num_workers=1 dist.bank_gpus=0.25
HIST=$RUNS/gpu-bank/final/history.json
KMEANS=$("$PY" -c 'import json, sys; m = json.load(open(sys.argv[1]))[-1]
print("cluster_device=%s, k-means %.3fs" % (m.get("cluster_device"), float(m.get("cluster_seconds") or 0)))' \
  "$HIST" 2>/dev/null)
if (( RC == 0 )) && [[ $KMEANS == cluster_device=gpu,* ]]; then on_gpu bank "$KMEANS (bank actor: 0.25 GPU)"
elif (( RC == 0 )); then record bank FAIL "$SECS" "${KMEANS:-no history.json} (expected cluster_device=gpu)"
else failed bank
fi

# ------------------------------------------------------------------------------ cams, cpucams
CKPT=$RUNS/gpu-train/final
[ -f "$CKPT/model.pt" ] || CKPT=$RUNS/gpu-bank/final
cams_summary() {  # the make_cams JSON line of a step's log, as "done/total CAM files, failed, s"
  grep '^{"out_dir"' "$LOGS/$1.log" | tail -n 1 | "$PY" -c 'import json, sys; s = json.load(sys.stdin)
print("%s/%s CAM files, %s failed, %ss" % (s.get("done", 0), s["total"], s.get("failed", 0), s["seconds"]))' 2>/dev/null
}
if [ -f "$CKPT/model.pt" ]; then
  run cams 70 "$PY" -m workflows.make_cams --checkpoint "$CKPT" --split val --limit 16 --out "$WORK/cams" \
    --gpu --actors-per-gpu 2
  CAMS=$(cams_summary cams)
  if (( RC == 0 )) && [ -n "$CAMS" ]; then on_gpu cams "$CAMS from $(basename "$(dirname "$CKPT")"), 2 actors per GPU"
  elif (( RC == 1 )) && [ -n "$CAMS" ]; then record cams FAIL "$SECS" "$CAMS"
  else failed cams
  fi
  run cpucams 50 "$PY" -m workflows.make_cams --checkpoint "$CKPT" --split val --limit 4 --out "$WORK/cams-cpu" \
    --no-gpu
  CAMS=$(cams_summary cpucams)
  if (( RC == 0 )) && [ -n "$CAMS" ] && [ "$DEVICE" = cpu ]; then
    record cpucams PASS "$SECS" "$CAMS; --no-gpu actors left the GPU alone"
  elif (( RC == 0 )) && [ -n "$CAMS" ]; then
    record cpucams FAIL "$SECS" "$CAMS; device $DEVICE: actors that asked for no GPU must not use it"
  elif (( RC == 1 )) && [ -n "$CAMS" ]; then record cpucams FAIL "$SECS" "$CAMS"
  else failed cpucams
  fi
else
  DEVICE=-
  record cams SKIP 0 "no checkpoint: the train and bank steps both failed"
  record cpucams SKIP 0 "no checkpoint: the train and bank steps both failed"
fi

# ----------------------------------------------------------------------------- refine half
# The whole pipeline on the GPU, one epoch per training stage: the refine half (train_affinity,
# make_masks, train_seg) runs the code its own commands run. Its JSON line gives each stage's time.
run refine 150 "$PY" -m workflows.pipeline --config configs/synthetic_tiny.yaml --out "$WORK/pipeline" \
  train.name=gpu-refine data.synthetic_images=32 train.epochs=1 dist.use_gpu=true dist.num_workers=1 \
  inference.actor_gpus=1 affinity.actor_gpus=1 seg.actor_gpus=1 "inference.scales=[1.0]" affinity.epochs=1 affinity.crop_size=64 seg.epochs=1 seg.crop_size=64
STAGES=$(grep '^{"out"' "$LOGS/refine.log" | tail -n 1 | "$PY" -c 'import json, sys
print(", ".join("%s %.0fs" % kv for kv in json.load(sys.stdin)["seconds"].items()))' 2>/dev/null)
SEG=$WORK/pipeline/runs/gpu-refine-seg/final
if (( RC == 0 )) && [ -n "$STAGES" ] && [ -f "$SEG/model.pt" ]; then on_gpu refine "$STAGES"
elif (( RC == 0 )); then record refine FAIL "$SECS" "finished without its segmenter (${STAGES:-no timings})"
else failed refine
fi

# ---------------------------------------------------------------------------------- predict
if [ -f "$SEG/model.pt" ]; then
  mkdir -p "$WORK/photos"
  for f in $(ls cpal_ray/assets/voc_mini/JPEGImages/*.jpg | head -n 4); do cp "$f" "$WORK/photos/"; done
  run predict 50 "$PY" -m workflows.predict --checkpoint "$SEG" --images "$WORK/photos" --out "$WORK/predicted" \
    seg.actor_gpus=1
  PRED=$(grep '^{"out_dir"' "$LOGS/predict.log" | tail -n 1 | "$PY" -c 'import json, sys; s = json.load(sys.stdin)
print("%s/%s PNGs, %s failed" % (s.get("done", 0), s["total"], s.get("failed", 0)))' 2>/dev/null)
  if (( RC == 0 )) && [ -n "$PRED" ]; then on_gpu predict "$PRED"
  else failed predict
  fi
else
  DEVICE=-
  record predict SKIP 0 "no segmenter: the refine step failed"
fi

# ------------------------------------------------------------------------------------ bench
run bench 60 "$PY" bench/bench_cpal_step.py --device cuda
TIMES_S=$(awk '$1 == "cam_step" || $1 == "cpal_step" { printf "%s%s %s s", sep, $1, $2; sep = ", " }' "$LOGS/bench.log")
RATIO=$(grep '^ratio ' "$LOGS/bench.log" | tail -n 1 | sed 's/^ratio cpal_step\/cam_step = /ratio /')
if (( RC == 0 )) && [ -n "$TIMES_S" ]; then on_gpu bench "median $TIMES_S; $RATIO"
else failed bench
fi

# ----------------------------------------------------------------------------------- table
TOTAL=$(( $(date +%s) - START ))
{
  echo
  echo "GPU readiness check, $(date -u +%Y-%m-%dT%H:%MZ), ${TOTAL}s in all (budget ${BUDGET}s)"
  printf '%-8s  %-6s  %8s  %-6s  %s\n' step device seconds status "key figure"
  printf '%-8s  %-6s  %8s  %-6s  %s\n' -------- ------ -------- ------ ----------
  for i in "${!NAMES[@]}"; do
    printf '%-8s  %-6s  %8s  %-6s  %s\n' "${NAMES[$i]}" "${DEVICES[$i]}" "${TIMES[$i]}" "${STATUSES[$i]}" "${KEYS[$i]}"
  done
  echo "logs: $LOGS"
} | tee "$LOGS/summary.txt"

if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work kept in $WORK"; else rm -rf "$WORK"; fi
for s in "${STATUSES[@]}"; do
  [ "$s" = PASS ] || exit 1
done
exit 0
