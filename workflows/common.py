"""Argument handling shared by the workflow entry points (argv is parsed only here)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cpal_ray.config import Config, load_config


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="YAML config (default: the embedded defaults)")
    p.add_argument("--address", default=None, help="Ray address to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cpal.tau=0.2 train.epochs=2")
    return p


def config_from_args(args) -> Config:
    return load_config(args.config, list(args.overrides))


def config_from_folders(args, *folders) -> Config:
    """``--config`` when given, else the ``config.yaml`` saved in the first of ``folders`` that has
    one (a checkpoint, a CAM folder), else the defaults; then the dotted overrides."""
    path = args.config
    for folder in folders if path is None else ():
        if folder and (Path(folder) / "config.yaml").is_file():
            path = Path(folder) / "config.yaml"
            break
    return load_config(path, list(args.overrides))


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
