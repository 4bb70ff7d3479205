"""The one figure saver and the one Markdown table writer of every report (seed mIoU, label mIoU,
the demo, a sweep's results): a figure is saved one way, a table is written one way.

Figures are drawn on a ``Figure`` with the Agg canvas directly, so library code never switches
matplotlib's global backend. Files go to a local path or a storage URI, atomically.
"""
from __future__ import annotations

import io
from pathlib import Path

from cpal_ray.storage import Location, location


def save_figure(fig, path, *, dpi: float | None = None, tight: bool = True) -> Path | Location:
    """Save ``fig`` as PNG (at ``dpi``, default the figure's own; ``tight``: cropped to what is
    drawn) to a local path (returned as a Path) or a storage URI / Location (returned as it is)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only where a figure is saved

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi if dpi is not None else fig.dpi, **({"bbox_inches": "tight"} if tight else {}))
    target = location(path).write_bytes(buf.getvalue())
    return Path(target.path) if target.is_local else target


def markdown_table(header: list[str], rows: list[list[str]], align: str = "") -> list[str]:
    """The lines of a Markdown table; ``align``: one letter per column, "l" or "r" (default "l")."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header), "l"))
    return ["| " + " | ".join(map(str, header)) + " |", rule] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
