"""Shared helpers of the benchmarks: machine description, interleaved timing, tables, the ratio line.

Every benchmark measures its comparison side by side in one run: the variants alternate
(A B, B A, A B, ... so a slow drift of the machine's load hits both alike) and the figures are
medians over the repetitions. ``paired_ratio`` is the median of the per-repetition ratios
(each one from two back-to-back measurements), the headline number of most benchmarks; the
ratio of the medians is printed beside it. The last printed line is always the ratio line.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The paper's setting (CPAL Sec. 4.1): VOC 2012 train_aug, global batch 16 over 8 GPUs.
PAPER_TRAIN_IMAGES = 10582
PAPER_GLOBAL_BATCH = 16
PAPER_STEPS_PER_EPOCH = PAPER_TRAIN_IMAGES // PAPER_GLOBAL_BATCH  # 661


# ------------------------------------------------------------------------------ the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a description only
        pass
    return "no GPU"


def machine_line() -> str:
    """One line: cores, CPU model, GPU, torch threads and the load average when the run starts."""
    try:
        import torch

        threads = torch.get_num_threads()
    except ImportError:
        threads = "?"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores ({cpu_model()}), {gpu_name()}, torch threads {threads}, "
            f"load average {load}")


def set_threads(n: int) -> int:
    """torch intra-op threads (0 = leave torch's default). The benchmarks default to 1: on a
    shared 2-core machine two OpenMP threads wait on each other whenever one is descheduled
    (measured here: a 7 ms step became 0.3-2 s), and a Ray Train worker with < 2 CPUs runs
    torch with OMP_NUM_THREADS=1 anyway."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def resolve_clock(name: str, device: str, threads: int) -> str:
    """'auto' -> 'cpu' (process CPU time) for a single-threaded CPU run, else 'wall'.

    On a shared machine the CPU time of a single-threaded process is what the work costs
    without the other tenants' interference (its wall time also counts the time it waited for a
    core); with several threads or a GPU only wall time is meaningful."""
    if name != "auto":
        return name
    return "cpu" if device == "cpu" and threads == 1 else "wall"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    """Wait for queued GPU work so wall-clock times mean something (no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- timing


def interleave(variants: dict[str, Callable[[], float | None]], reps: int, warmup: int = 1,
               on_rep: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Run the variants alternately ``reps`` times (order A B, B A, A B, ...) after ``warmup``
    untimed rounds. A variant returns its own measured seconds, or None to be timed whole.
    Returns {name: [seconds per repetition]}."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t0 = time.perf_counter()
            got = variants[n]()
            dt = time.perf_counter() - t0 if got is None else float(got)
            if r >= warmup:
                times[n].append(dt)
        if on_rep is not None and r >= warmup:
            on_rep(r - warmup)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if len(xs) else float("nan")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of num[i] / den[i]: each ratio comes from two measurements taken back to back."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def spread(xs: Sequence[float]) -> str:
    """'min-max' of a sample, for the tables (shows how noisy the machine was)."""
    return f"{min(xs):.3g}-{max(xs):.3g}" if len(xs) else "-"


# --------------------------------------------------------------------------------- output


def print_table(headers: Sequence[str], rows: Sequence[Sequence]) -> None:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def ratio_line(name: str, value: float, op: str, target: float, unit: str = "") -> str:
    """'ratio <name> = <value> (target <op> <target>, met|MISSED)'. op is '<=' or '>='."""
    met = value <= target if op == "<=" else value >= target
    return f"ratio {name} = {value:.3f}{unit} (target {op} {target:g}{unit}, {'met' if met else 'MISSED'})"


def base_parser(doc: str) -> argparse.ArgumentParser:
    first = (doc or "").strip().splitlines()[0] if doc else ""
    p = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run (< 30 s) for smoke tests")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per variant (0 = the benchmark's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; see set_threads)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="what the headline ratio uses: wall time or process CPU time (auto: see resolve_clock)")
    return p


def header(title: str, command_args: Sequence[str] | None = None) -> None:
    args = " ".join(sys.argv[1:] if command_args is None else command_args)
    print(f"== {title}")
    print(f"command: python {Path(sys.argv[0]).as_posix()} {args}".rstrip())
    print(machine_line())


# ------------------------------------------------------------------------------------ data


def clustered_unit_vectors(num_classes: int, per_class: int, dim: int, modes: int = 30, spread_: float = 0.35,
                           seed: int = 0) -> np.ndarray:
    """Bank-like data: per class, ``per_class`` L2-normalised vectors around ``modes`` random
    directions (uneven mode weights; Gaussian noise of norm ~``spread_`` around each unit direction).
    Returns float32 (num_classes, per_class, dim)."""
    rng = np.random.default_rng(seed)
    out = np.empty((num_classes, per_class, dim), dtype=np.float32)
    for c in range(num_classes):
        base = rng.standard_normal(dim)
        centres = base[None] + 0.8 * rng.standard_normal((modes, dim))
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        weights = rng.dirichlet(np.full(modes, 2.0))
        which = rng.choice(modes, size=per_class, p=weights)
        x = centres[which] + spread_ / np.sqrt(dim) * rng.standard_normal((per_class, dim))
        out[c] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def multilabel_batch(batch: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Multi-hot (B, N) float32 with 1 to 3 positive classes per image (VOC averages ~1.5)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, num_classes), dtype=np.float32)
    for b in range(batch):
        k = 1 + b % 3
        labels[b, rng.choice(num_classes, size=k, replace=False)] = 1.0
    return labels


def fill_bank(bank, seed: int = 0) -> None:
    """Fill every class of a ``PrototypeBank`` to capacity with clustered unit vectors."""
    data = clustered_unit_vectors(bank.num_classes, bank.capacity, bank.dim, seed=seed)
    for c in range(bank.num_classes):
        bank.push(("fill", c), np.full(bank.capacity, c), data[c])
