"""Every benchmark of bench/ runs with --quick and ends with its ratio line (opt-in: ``-m slow``).

    .venv/bin/python -m pytest -m slow tests/test_bench_smoke.py
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = ["bench_cpal_step.py", "bench_bank_traffic.py", "bench_kmeans.py", "bench_crf_throughput.py",
           "bench_multiscale.py", "bench_data_loading.py", "bench_bank_scale.py"]
# "ratio <name> = <number>[ unit] (target <op> <number>[ unit], met|MISSED)"
RATIO_LINE = re.compile(r"^ratio \S.* = [0-9.]+(e[-+]?\d+)?( %)? \(target (<=|>=) [0-9.]+( %)?, (met|MISSED)\)$")


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES)
def test_bench_quick_prints_ratio_last(bench):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / bench), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert lines, f"{bench} printed nothing; stderr: {proc.stderr[-2000:]}"
    assert RATIO_LINE.match(lines[-1]), f"{bench}: last line is not a ratio line: {lines[-1]!r}"
    assert any(ln.startswith("machine: ") for ln in lines), f"{bench}: no machine line"
