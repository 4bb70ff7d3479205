"""Small helpers for reported numbers, shared by every layer: finiteness, strict JSON, percents,
and a progress bar for long loops."""
from __future__ import annotations

import math
from typing import Any


def is_finite(x: Any) -> bool:
    """True for a real, finite int or float (bools, None, NaN and ±inf are not)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def finite_or_none(values) -> list:
    """Each value kept when finite, else None (a list for strict JSON or metrics)."""
    return [v if is_finite(v) else None for v in values]


def json_safe(x: Any) -> Any:
    """Non-finite floats -> None (strict JSON), recursively through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def strict_json(x: Any, **kwargs) -> str:
    """``json.dumps`` of ``x`` that every JSON parser reads: NaN and ±inf become null (``json_safe``),
    other objects their ``str`` (``default=str``), and ``allow_nan=False`` as the last guard.
    Every JSON file cpal-ray writes, and every summary it prints, goes through here."""
    import json

    kwargs.setdefault("default", str)
    return json.dumps(json_safe(x), allow_nan=False, **kwargs)


def _as_float(x: Any) -> float | None:
    """x as a finite float (numpy scalars included), else None."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct(x: Any, digits: int = 1) -> str:
    """A fraction as a percent string (0.1234 -> "12.3"); "—" when missing or not finite."""
    v = _as_float(x)
    return "—" if v is None else f"{100 * v:.{digits}f}"


def pct_pm(mean: Any, std: Any, digits: int = 1) -> str:
    """"mean ± std" in percent; "—" when the mean is missing."""
    if _as_float(mean) is None:
        return "—"
    return f"{pct(mean, digits)} ± {pct(std if _as_float(std) is not None else 0.0, digits)}"


def progress(iterable, desc: str, total: int | None = None):
    """``iterable`` with a tqdm progress bar on an interactive terminal (none in logs, jobs, tests)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=None, leave=False, dynamic_ncols=True)
