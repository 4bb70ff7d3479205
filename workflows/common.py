"""Argument handling shared by the workflow entry points (argv is parsed only here)."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from cpal_ray.config import GPU_SHARE_SECTIONS, Config, ConfigError, load_config
from workflows.commands import COMMANDS


# The exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def run(main, argv=None) -> None:
    """``sys.exit(main(argv))`` for an entry point, with ``USER_ERRORS`` as one line on stderr and
    exit status 2 (the status argparse uses for a bad command line). An OSError from the system that names
    no file (``os.getcwd()`` of a deleted folder, say) is not about an input: it keeps its traceback.
    Ctrl-C is one line (a training run's says where it resumes) and exit status 130."""
    try:
        code = main(argv)
    except KeyboardInterrupt as e:
        interrupted(e)
    except Exception as e:
        from cpal_ray.engine.inputs import USER_ERRORS  # not before: --help must not wait for torch

        if not isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno is not None and not e.filename):
            raise  # a bug, or the system about no file in particular (cpal-ray's own errors name their file)
        print(f"error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def interrupted(e: KeyboardInterrupt | None = None) -> None:
    """Ctrl-C: its one line on stderr, exit status 130 (no traceback)."""
    print(str(e) if e is not None and str(e) else "interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


class Parser(argparse.ArgumentParser):
    """``parse_args`` takes the dotted overrides anywhere among the flags (``parse_intermixed_args``):
    ``--config x train.epochs=2 --num-cpus 2`` as well as flags first."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` is the entry point's docstring: its first line, then the options,
    then the rest (the example commands and what the command writes) as written, without the
    double backticks of reST, and with the examples in the form the user ran (``cpal-ray train``
    under a ``cpal-ray train`` usage line; ``ray job submit`` lines keep ``python -m``, the form a
    job's entrypoint needs)."""
    prog = _prog()
    first, _, rest = doc.strip().replace("``", "").partition("\n")
    if prog and prog.startswith("cpal-ray "):
        commands = {module: command for command, (module, _) in COMMANDS.items()}
        rest = re.sub(r"^(\s*)python -m workflows\.(\w+)", lambda m: f"{m.group(1)}cpal-ray "
                      f"{commands.get(m.group(2), m.group(2))}", rest, flags=re.M)
    return Parser(prog=prog, description=first, epilog=rest.strip("\n") or None,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def _prog() -> str | None:
    """How the user ran it, for the usage line: ``python -m workflows.<name>`` or ``cpal-ray <command>``
    (argparse's default is the file name, ``train.py``, which is neither)."""
    script = Path(sys.argv[0])
    if script.name == "cpal-ray" or (script.name == "cli.py" and script.parent.name == "workflows"):
        return f"cpal-ray {sys.argv[1]}" if len(sys.argv) > 1 else "cpal-ray"
    if script.suffix == ".py" and script.parent.name == "workflows":
        return f"python -m workflows.{script.stem}"
    return None


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = doc_parser(doc)
    p.add_argument("--config", default=None, help="YAML config, local or a URI (default: the embedded defaults)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the YAML, overrides and flags applied) and exit; nothing starts")
    p.add_argument("--address", default=None,
                   help="Ray to join (default: $RAY_ADDRESS, else a cluster running on this machine, else a new "
                        "local Ray); 'local' = always a private local Ray")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a private local Ray (implies --address local)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cpal.tau=0.2 train.epochs=2 (anywhere among "
                                                "the flags)")
    return p


def flag_overrides(args, *flags: tuple[str, str]) -> list[str]:
    """Dotted overrides for the ``(flag, config field)`` pairs whose flag was given (its value not
    None; ``--gpu``/``--no-gpu`` as true/false). Each field is remembered in ``args.flag_fields``,
    so that a bad value is reported against the flag the user typed, not the field behind it."""
    out, given = [], vars(args).setdefault("flag_fields", {})
    for flag, field in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else \
            f"[{', '.join(map(str, value))}]" if isinstance(value, list) else value
        out.append(f"{field}={text}")
        given[field] = (flag if value else f"--no-{flag[2:]}") if isinstance(value, bool) else \
            f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
    return out


def add_tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mlflow-uri", default=None,
                   help="also log every epoch to MLflow at this tracking URI (train.mlflow_uri; needs mlflow); "
                        "TensorBoard files, history.json and curves.png are always in the run folder")


def tracking_overrides(args) -> list[str]:
    return flag_overrides(args, ("--mlflow-uri", "train.mlflow_uri"))


def add_cam_actor_flags(p: argparse.ArgumentParser) -> None:
    """Resources of the Ray Data CAM actors (shortcuts for the inference.* config fields)."""
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="actors on GPUs or not (sets inference/affinity/seg.actor_gpus: 1 / --actors-per-gpu, or 0)")
    p.add_argument("--actors-per-gpu", type=int, default=None,
                   help="actors sharing one GPU (implies --gpu: actor_gpus = 1 / N)")
    p.add_argument("--cam-cpus", type=float, default=None, help="CPUs per CAM actor (inference.actor_cpus)")
    p.add_argument("--cam-actors", type=int, default=None,
                   help="the most CAM actors; the pool grows with the cluster up to it (inference.max_actors, 0 = no limit)")


def cam_actor_overrides(args) -> list[str]:
    """The CAM actor flags that were given, as dotted overrides (``--gpu`` -> inference.actor_gpus=1.0)."""
    out = flag_overrides(args, ("--cam-cpus", "inference.actor_cpus"), ("--cam-actors", "inference.max_actors"))
    if args.actors_per_gpu is not None and args.actors_per_gpu < 1:
        raise ConfigError(f"--actors-per-gpu: must be >= 1, got {args.actors_per_gpu}", "inference.actor_gpus")
    if args.gpu is not None or args.actors_per_gpu is not None:
        share = 0.0 if args.gpu is False else 1.0 / (args.actors_per_gpu or 1)
        out += [f"{section}.actor_gpus={share}" for section in GPU_SHARE_SECTIONS]
    return out


def add_split_flags(p: argparse.ArgumentParser, out: str, split: str = "val", split_help: str = "",
                    overwrite: str = "redo every file, even with other settings") -> None:
    """``--out``, ``--split``, ``--limit`` and (``overwrite`` its help; "" = none) ``--overwrite`` of the
    commands that write or score one file per image of a dataset split."""
    p.add_argument("--out", default=None, help=out)
    p.add_argument("--split", default=split, help=split_help or f"dataset split (default {split})")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help=overwrite)


def add_seg_flags(p: argparse.ArgumentParser) -> None:
    """The segmenter's prediction settings (shortcuts for seg.* fields: ``seg_overrides``)."""
    p.add_argument("--scales", type=float, nargs="+", default=None, help="inference scales (seg.scales)")
    p.add_argument("--flip", action="store_true", default=None, help="also predict the mirrored images (seg.flip)")
    p.add_argument("--crf", action="store_true", default=None, help="DenseCRF post-processing (seg.crf)")
    p.add_argument("--actors", type=int, default=None, help="the most prediction actors (seg.max_actors, 0 = no limit)")


def seg_overrides(args) -> list[str]:
    """The segmenter flags that were given, as dotted overrides (``--flip`` -> seg.flip=true)."""
    return flag_overrides(args, ("--scales", "seg.scales"), ("--flip", "seg.flip"), ("--crf", "seg.crf"),
                          ("--actors", "seg.max_actors"))


def parse_command(p: argparse.ArgumentParser, argv, *overrides) -> argparse.Namespace:
    """``argv`` parsed, logging set up, and the dotted overrides of the flags that set config fields
    (each of ``overrides`` a function of the args, e.g. ``cam_actor_overrides``) appended to the
    command line's: one path into the config, one validation."""
    args = p.parse_args(argv)
    setup_logging()
    args.overrides = [*args.overrides, *(o for of in overrides for o in of(args))]
    return args


def config_from_args(args, default=None, *, show: bool = True) -> Config:
    """``--config`` (else ``default``, else the embedded defaults) with the dotted overrides; with
    ``--print-config`` (and ``show``) the resolved config is printed and the command ends here."""
    return _load(args, args.config or default, show)


def config_from_folders(args, *folders, show: bool = True) -> Config:
    """``--config`` when given, else the ``config.yaml`` saved in the first of ``folders`` (local
    paths or URIs: a checkpoint, a CAM folder) that has one, else the defaults; then the dotted
    overrides (and ``--print-config`` as ``config_from_args``). A checkpoint's ``config.yaml`` is
    checked against its ``SHA256SUMS`` first (``CheckpointError`` naming it when damaged)."""
    from cpal_ray.engine.checkpoint import check_config_file
    from cpal_ray.storage import location

    path = args.config
    for folder in folders if path is None else ():
        if folder and (location(folder) / "config.yaml").is_file():
            path = location(folder) / "config.yaml"
            check_config_file(folder)
            break
    return _load(args, path, show)


def _load(args, path, show: bool) -> Config:
    try:
        cfg = load_config(path, list(args.overrides))
    except ConfigError as e:
        flag = getattr(args, "flag_fields", {}).get(e.field)
        if flag is None:
            raise
        raise ConfigError(f"{flag}: {str(e).rpartition(f'{e.field}: ')[2]} ({e.field})", e.field) from None
    return print_config(args, cfg) if show else cfg


def print_config(args, cfg: Config) -> Config:
    """With ``--print-config``: print ``cfg`` as the YAML it would be saved as, and exit 0."""
    if getattr(args, "print_config", False):
        from cpal_ray.config import config_yaml

        print(config_yaml(cfg), end="")
        sys.exit(0)
    return cfg


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stage_training_main(doc: str, task: str, label_flag: str, label_field: str, argv=None) -> int:
    """The body of ``workflows.train_affinity`` / ``train_seg``: the CAM run's config (``--config``,
    else the ``config.yaml`` of ``--from``) as the run of ``task`` (``train.task``, set before the
    config is built: an override of a CAM setting the stage does not read is an error naming the
    stage's field), the label folder (``--<label_flag>``), the run named ``<train.name>-<task>``
    (``Config.for_task``), checked before Ray starts, then Ray Train."""
    from cpal_ray.formatting import strict_json

    p = base_parser(doc)
    p.add_argument("--from", dest="source", default=None,
                   help="the CAM run's final/ folder (or any folder with its config.yaml): its config is the base")
    p.add_argument(f"--{label_flag}", default=None,
                   help=f"folder of label PNGs to train on ({label_field}; default: the config's)")
    p.add_argument("--name", default=None, help="run name (default <train.name>-" + task + ")")
    add_tracking_flags(p)
    args = p.parse_args(argv)
    setup_logging()
    args.overrides = [*args.overrides, *tracking_overrides(args), *flag_overrides(args, (f"--{label_flag}", label_field)),
                      f"train.task={task}"]
    from cpal_ray.distributed.runtime import init_ray
    from cpal_ray.distributed.trainer import run_training
    from cpal_ray.engine.inputs import check_training_inputs

    cfg = print_config(args, config_from_folders(args, args.source, show=False).for_task(task, args.name))
    cfg = check_training_inputs(cfg)
    init_ray(args.address, args.num_cpus)
    result = run_training(cfg)
    print(strict_json({"run_dir": str(result.run_dir), "final": str(result.final_dir), "task": task,
                       "epoch": result.metrics.get("epoch"), "loss": result.metrics.get("loss")}))
    return 0
