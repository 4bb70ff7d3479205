"""Data shipped inside the package and the ``bundled:`` root names that point at it.

Paths are found from this file's location, never from the working directory, so they work in
an editable checkout, an installed wheel and inside Ray workers alike.
"""
from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
# 114 real photos with masks in the VOC layout (see voc_mini/PROVENANCE.md).
VOC_MINI_DIR = ASSETS_DIR / "voc_mini"
# Real VOC 2012 image-level labels and id lists, no images (see voc12_meta/PROVENANCE.md).
VOC12_META_DIR = ASSETS_DIR / "voc12_meta"

BUNDLED_ROOTS = {"bundled:voc-mini": VOC_MINI_DIR}
# Label files shipped in the package, by the name a config (data.cls_labels) and a run's record use.
BUNDLED_LABELS = {"bundled:voc12": VOC12_META_DIR / "cls_labels.npy",
                  "bundled:voc-mini": VOC_MINI_DIR / "cls_labels.npy"}


def resolve_root_path(root: str | os.PathLike) -> Path:
    """``"bundled:voc-mini"`` -> the packaged folder; any other string -> that path (``~``
    expanded). An unknown ``bundled:`` name raises ValueError listing the known ones."""
    text = os.fspath(root)
    if text.startswith("bundled:"):
        if text not in BUNDLED_ROOTS:
            raise ValueError(f"unknown bundled dataset {text!r}; known: {sorted(BUNDLED_ROOTS)}")
        return BUNDLED_ROOTS[text]
    return Path(text).expanduser()


def bundled_name(path: str | os.PathLike) -> str | None:
    """The ``bundled:`` name of a packaged label file, or None for any other path."""
    resolved = Path(path).expanduser().resolve()
    return next((name for name, p in BUNDLED_LABELS.items() if p == resolved), None)
