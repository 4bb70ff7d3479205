"""Digest of what a checkout computes on the synthetic config, to show a refactor changed nothing.

    python bench/equivalence.py --out /tmp/eq-before      # on the old checkout
    python bench/equivalence.py --out /tmp/eq-after       # on the new one
    python bench/equivalence.py --compare /tmp/eq-before/digest.json /tmp/eq-after/digest.json

Two runs, both through the project's own commands, so the script outlives any move of the code:
a local training (``cpal_ray.engine.local.fit_local``, no Ray, bank in process) and the whole
pipeline (``workflows.pipeline`` on a private local Ray, one training worker so that the bank
receives its pushes in one order). The digest holds the SHA-256 of every tensor of every
checkpoint (model, optimizer, schedule, bank) and of every PNG the pipeline wrote (CRF seeds,
pseudo masks, predictions). ``--compare`` prints each entry that differs and exits 1 if any does.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_tiny.yaml"


def _tensor_digests(obj, prefix: str, out: dict) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        out[prefix] = f"{tuple(t.shape)} {t.dtype} " + hashlib.sha256(t.numpy().tobytes()).hexdigest()
    elif isinstance(obj, np.ndarray):
        out[prefix] = f"{obj.shape} {obj.dtype} " + hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensor_digests(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensor_digests(v, f"{prefix}[{i}]", out)


def checkpoint_digests(folder: Path, name: str, out: dict) -> None:
    import torch

    for f in sorted(folder.glob("*.pt")):
        _tensor_digests(torch.load(f, map_location="cpu", weights_only=False), f"{name}/{f.name}", out)


def local_run(out: Path) -> dict:
    from cpal_ray.config import load_config
    from cpal_ray.engine.local import epoch_dirs, fit_local

    cfg = load_config(CONFIG)
    fit_local(cfg, out_dir=str(out / "local"))
    digests: dict = {}
    for folder in epoch_dirs(str(out / "local")):
        checkpoint_digests(Path(str(folder)), f"local/{folder.name}", digests)
    return digests


def pipeline_run(out: Path) -> dict:
    cmd = [sys.executable, "-m", "workflows.pipeline", "--config", CONFIG, "--out", str(out / "pipeline"),
           "--address", "local", "--num-cpus", "2", "dist.num_workers=1", "dist.cpus_per_worker=0.9"]
    subprocess.run(cmd, cwd=REPO, check=True)
    digests: dict = {}
    root = out / "pipeline"
    for final in sorted(root.glob("runs/*/final")):
        checkpoint_digests(final, f"pipeline/{final.parent.name}", digests)
    for png in sorted(root.rglob("*.png")):
        if "runs" not in png.relative_to(root).parts:
            digests[f"pipeline/{png.relative_to(root)}"] = hashlib.sha256(png.read_bytes()).hexdigest()
    return digests


def compare(a: Path, b: Path) -> int:
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    differ = sorted(k for k in da.keys() & db.keys() if da[k] != db[k])
    only = sorted(da.keys() ^ db.keys())
    for k in differ:
        print(f"differs: {k}")
    for k in only:
        print(f"only in {'first' if k in da else 'second'}: {k}")
    same = len(da.keys() & db.keys()) - len(differ)
    print(f"{same} equal, {len(differ)} differ, {len(only)} in one digest only")
    return 1 if differ or only else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="empty folder for the runs and digest.json")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("--out or --compare is required")
    args.out.mkdir(parents=True, exist_ok=False)
    digests = {**local_run(args.out), **pipeline_run(args.out)}
    (args.out / "digest.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
    print(f"{len(digests)} digests in {args.out / 'digest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
