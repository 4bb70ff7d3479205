"""Tables and plots of a finished (or interrupted) sweep, from Tune's ``ResultGrid``.

Nothing here imports Ray: a result grid is read as an iterable of results with ``config``,
``metrics``, ``error`` and ``path`` (``ray.tune.Result``), so tests can pass plain objects.

Files written into the experiment folder:
  results.csv / results.md  one row per point: seed mIoU mean ± std over seeds, best background
                            threshold, wall time, the paper's number; failed trials with their error;
                            then every map the trials scored (CAM, PACAM, PACAM with its own
                            background) with the foreground share of its seeds and the contrast,
                            and the no-model floor rows (``floors.json``) of the scored split;
                            then, per epoch, the PACAM's lead over the CAM and both contrasts
                            (the training diagnostics on ``train.diag_images`` images)
  trials.csv                one row per trial (point, seed, status, mIoU, threshold, wall time, error)
  best_config.yaml          the base config with the best point's overrides
  heatmap_k_tau.png         mean seed mIoU over K x tau (when the space has cpal.top_k and cpal.tau)
  bars.png                  one bar per point (± std), the paper's values beside them when known
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import posixpath
import statistics
from typing import Any

import numpy as np

from cpal_ray.config import from_dict, save_config
from cpal_ray.data import build_dataset
from cpal_ray.formatting import is_finite, pct_pm
from cpal_ray.inference.evaluate import evaluate_floors
from cpal_ray.inference.writers import markdown_table, save_figure
from cpal_ray.storage import Location, location
from cpal_ray.sweeps.spaces import expand, point_label, point_overrides

SPEC_FILE = "sweep.json"
FLOORS_FILE = "floors.json"
HEATMAP_KEYS = ("cpal.top_k", "cpal.tau")
# The maps a trial's evaluation scores (``evaluate_seeds``'s sources) and the names in the tables.
MAPS = {"cam": "CAM", "pacam": "PACAM", "pacam_argmax": "PACAM, own background (argmax)"}
# Per-trial metrics of every map: <map>_miou and <map>_fg (foreground share of its seeds at its
# best threshold), the truth's gt_fg, and the contrast (mean on the class / mean on background).
MAP_METRICS = tuple(f"{m}_{k}" for m in MAPS for k in ("miou", "fg")) + ("gt_fg", "cam_ratio", "pacam_ratio")
# The per-epoch diagnostics a trial reports while it trains (``train.diag_images`` > 0).
EPOCH_DIAGS = ("diag_cam_miou", "diag_pacam_miou", "diag_cam_ratio", "diag_pacam_ratio")
EPOCH_COLUMNS = 10  # the most epochs the per-epoch table shows


def source_metrics(seeds: dict, contrast: dict | None = None) -> dict[str, float]:
    """Flat per-map metrics of a trial from an ``evaluate_seeds`` result (and a ``contrast_report``)."""
    out: dict[str, float] = {}
    for name, r in seeds.get("sources", {}).items():
        out[f"{name}_miou"], out[f"{name}_fg"] = float(r["best_miou"]), float(r["fg_fraction"])
        out["gt_fg"] = float(r["gt_fg_fraction"])
    for name in ("cam", "pacam"):
        if contrast and name in contrast:
            out[f"{name}_ratio"] = float(contrast[name]["ratio"])
    return out


def _short_error(error) -> str:
    """The last line of an error's text (the original ``Type: message`` of a failed task)."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def final_metrics(result) -> dict:
    """A trial's final report: the last metrics row tagged ``phase == "final"`` (rows from
    ``result.metrics_dataframe`` when there is one, whatever order Tune received them in), else
    its last metrics."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is not None and "phase" in getattr(frame, "columns", ()):
        final = frame[frame["phase"] == "final"]
        if len(final):
            return {k: v for k, v in final.iloc[-1].to_dict().items()}
    return dict(result.metrics or {})


def epoch_diagnostics(result) -> dict[int, dict[str, float]]:
    """A trial's training diagnostics (``EPOCH_DIAGS``) by epoch, from its metrics rows; the last
    row of an epoch wins (a resumed trial reports its epochs again)."""
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or "epoch" not in getattr(frame, "columns", ()):
        return {}
    out: dict[int, dict[str, float]] = {}
    if "training_iteration" in frame.columns:  # report order, whatever order Tune received them in
        frame = frame.sort_values("training_iteration", kind="stable")
    for row in frame.to_dict("records"):
        values = {k: float(row[k]) for k in EPOCH_DIAGS if is_finite(row.get(k))}
        if values and is_finite(row.get("epoch")):
            out[int(row["epoch"])] = values
    return out


def trial_config(result) -> dict:
    """A trial's config: ``result.config``, else its ``params.json`` in the trial folder (a
    restored grid can lose the config of a trial that failed)."""
    if result.config:
        return dict(result.config)
    fs, path = getattr(result, "filesystem", None), getattr(result, "path", None)
    if fs is None or not path:
        return {}
    try:
        with fs.open_input_stream(f"{str(path).rstrip('/')}/params.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def trial_records(grid, spec: dict) -> list[dict[str, Any]]:
    """One dict per trial: point, seed, status ("ok" / "error" / "unfinished"), final metrics, error."""
    records = []
    for result in grid:
        config, metrics = trial_config(result), final_metrics(result)
        point = {k: config.get(k) for k in spec["space"]}
        ok = result.error is None and metrics.get("phase") == "final" and is_finite(metrics.get("seed_miou"))
        status = "ok" if ok else ("error" if result.error is not None else "unfinished")
        records.append({
            "trial_id": metrics.get("trial_id") or posixpath.basename(str(result.path).rstrip("/")),
            "label": point_label(point), "point": point, "seed": config.get("train.seed", spec["seeds"][0]),
            "status": status, "seed_miou": metrics["seed_miou"] if ok else None,
            "best_threshold": metrics.get("best_threshold") if ok else None,
            "wall_seconds": metrics.get("wall_seconds") if ok else None, "error": _short_error(result.error),
            **{k: metrics[k] if ok and is_finite(metrics.get(k)) else None for k in MAP_METRICS},
            "epochs": epoch_diagnostics(result) if ok else {},
        })
    return records


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict], spec: dict) -> list[dict[str, Any]]:
    """One row per point (grid order), aggregated over its seeds."""
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    order = [point_label(p) for p in expand(spec["space"])]
    labels = [lbl for lbl in order if lbl in by_label] + [lbl for lbl in by_label if lbl not in order]
    rows = []
    for label in labels:
        trials = by_label[label]
        ok = [t for t in trials if t["status"] == "ok"]
        mious = [t["seed_miou"] for t in ok]
        rows.append({
            "label": label, "point": trials[0]["point"], "trials": len(trials), "seeds_ok": len(ok),
            "unfinished": sum(t["status"] == "unfinished" for t in trials),
            "seed_miou_mean": statistics.fmean(mious) if mious else None,
            "seed_miou_std": statistics.stdev(mious) if len(mious) > 1 else (0.0 if mious else None),
            "best_threshold": statistics.fmean(t["best_threshold"] for t in ok) if ok else None,
            "wall_seconds": statistics.fmean(t["wall_seconds"] for t in ok) if ok else None,
            "paper_miou": spec.get("paper", {}).get(label),
            "errors": "; ".join(sorted({t["error"] for t in trials if t["error"]})),
            **{k: _mean_std([t.get(k) for t in ok]) for k in MAP_METRICS},
            "epochs": _epoch_means(ok),
        })
    return rows


def _epoch_means(trials: list[dict]) -> dict[int, dict[str, float]]:
    """Per epoch, the mean of each diagnostic over the ``trials`` that reported it, and how many did
    (``seeds``)."""
    epochs = sorted({e for t in trials for e in t.get("epochs", {})})
    out = {}
    for e in epochs:
        per = [t["epochs"][e] for t in trials if e in t.get("epochs", {})]
        out[e] = {k: statistics.fmean(p[k] for p in per if k in p) for k in EPOCH_DIAGS if any(k in p for p in per)}
        out[e]["seeds"] = len(per)
    return out


def best_row(rows: list[dict]) -> dict | None:
    done = [r for r in rows if r["seed_miou_mean"] is not None]
    return max(done, key=lambda r: r["seed_miou_mean"]) if done else None


def write_results(grid, out_dir, spec: dict | None = None) -> dict[str, str]:
    """Write the tables, the best config and the plots; returns {kind: path} of what was written."""
    out = location(out_dir)
    spec = spec or json.loads((out / SPEC_FILE).read_text())
    records = trial_records(grid, spec)
    rows = summarise(records, spec)
    files = {"csv": _write_csv(rows, spec, out / "results.csv"),
             "trials_csv": _write_trials(records, out / "trials.csv")}
    best = best_row(rows)
    if best is not None:
        cfg = from_dict(spec["base"]).replace(**point_overrides(best["point"], spec["rows"]))
        files["best_config"] = str(save_config(cfg, out / "best_config.yaml"))
        files["bars"] = _plot_bars(rows, out / "bars.png")
        if all(k in spec["space"] for k in HEATMAP_KEYS):
            files["heatmap"] = _plot_heatmap(rows, out / "heatmap_k_tau.png")
    files["markdown"] = _write_markdown(rows, records, spec, best, out / "results.md", floors=_floors(out, spec))
    return files


def _floors(out: Location, spec: dict) -> dict | None:
    """The no-model rows of the scored split (``evaluate_floors``), computed once into ``floors.json``;
    None when the base config's data cannot be read here."""
    path = out / FLOORS_FILE
    if path.is_file():
        return json.loads(path.read_text())

    try:
        dataset = build_dataset(from_dict(spec["base"]).data, spec.get("eval_split", "val"), train=False)
    except (OSError, ValueError):
        return None
    floors = evaluate_floors(dataset, spec.get("eval_max_images", 0))
    path.write_text(json.dumps(floors, indent=2))
    return floors


# ------------------------------------------------------------------------------------- tables


@contextlib.contextmanager
def _text_file(path: Location):
    """A text buffer written to ``path`` (atomically) when the block ends."""
    buf = io.StringIO(newline="")
    yield buf
    path.write_text(buf.getvalue())


def _fmt(x, pattern="{:.4f}") -> str:
    return pattern.format(x) if is_finite(x) else ""


def _write_csv(rows: list[dict], spec: dict, path: Location) -> str:
    keys = list(spec["space"])
    with _text_file(path) as f:
        w = csv.writer(f)
        w.writerow(["label", *keys, "trials", "seeds_ok", "seed_miou_mean", "seed_miou_std", "best_threshold",
                    "wall_seconds", "paper_miou", "errors"])
        for r in rows:
            w.writerow([r["label"], *(r["point"][k] for k in keys), r["trials"], r["seeds_ok"],
                        _fmt(r["seed_miou_mean"]), _fmt(r["seed_miou_std"]), _fmt(r["best_threshold"], "{:.2f}"),
                        _fmt(r["wall_seconds"], "{:.1f}"), _fmt(r["paper_miou"], "{:.1f}"), r["errors"]])
    return str(path)


def _write_trials(records: list[dict], path: Location) -> str:
    with _text_file(path) as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "label", "seed", "status", "seed_miou", "best_threshold", "wall_seconds", "error"])
        for r in records:
            w.writerow([r["trial_id"], r["label"], r["seed"], r["status"], _fmt(r["seed_miou"]),
                        _fmt(r["best_threshold"], "{:.2f}"), _fmt(r["wall_seconds"], "{:.1f}"), r["error"]])
    return str(path)


def _pm(pair) -> str:
    return pct_pm(*pair) if pair[0] is not None else "—"


def _fg(pair) -> str:
    return f"{100 * pair[0]:.0f}" if pair[0] is not None else "—"


def _map_table(rows: list[dict], floors: dict | None) -> list[str]:
    """Every map each point's trials scored, its seeds' foreground share, the PACAM-minus-CAM
    difference and the contrast; then the no-model floors."""
    maps = [m for m in MAPS if any(r[f"{m}_miou"][0] is not None for r in rows)]
    if not maps:
        return []
    head = " | ".join(f"{MAPS[m]} seeds (%) | fg (%)" for m in maps)
    lines = ["", "## Every map scored", "",
             "Seed mIoU mean ± std over the seeds of each point, every map from the same trained models; fg = share "
             "of the scored pixels the seeds call foreground (at each map's best threshold); contrast = mean of the map "
             "on its class's pixels / on background pixels (single scale).", "",
             f"| point | {head} | PACAM − CAM | contrast CAM / PACAM |", "|---|" + "---|---|" * len(maps) + "---|---|"]
    for r in rows:
        diff = (r["pacam_miou"][0] - r["cam_miou"][0]) if None not in (r["pacam_miou"][0], r["cam_miou"][0]) else None
        contrast = " / ".join(f"{r[k][0]:.2f}" if r[k][0] is not None else "—" for k in ("cam_ratio", "pacam_ratio"))
        cells = " | ".join(f"{_pm(r[f'{m}_miou'])} | {_fg(r[f'{m}_fg'])}" for m in maps)
        lines.append(f"| {r['label']} | {cells} | {f'{100 * diff:+.1f}' if diff is not None else '—'} | {contrast} |")
    if floors:
        gt = floors.get("gt_fg_fraction")
        for name, text in (("fill_first_class", "floor: every pixel = the image's first class"),
                           ("all_background", "floor: every pixel background")):
            f = floors[name]
            lines.append(f"| {text} | {100 * f['miou']:.1f} | {100 * f['fg_fraction']:.0f} |"
                         + " |" * (2 * len(maps) - 2) + " — | — |")
        if is_finite(gt):
            lines += ["", f"Ground truth: {100 * gt:.0f} % of the scored pixels are foreground "
                          f"({floors.get('images')} images)."]
    return lines


def _epoch_table(rows: list[dict]) -> list[str]:
    """Per epoch and point (mean over its seeds): PACAM minus CAM seed mIoU on the diagnostic images,
    and the contrast of each map; points without a PACAM are left out."""
    rows = [r for r in rows if any("diag_pacam_miou" in d for d in r.get("epochs", {}).values())]
    if not rows:
        return []
    epochs = sorted({e for r in rows for e in r["epochs"]})
    if len(epochs) > EPOCH_COLUMNS:  # evenly spaced, the first and the last kept
        epochs = sorted({epochs[round(i * (len(epochs) - 1) / (EPOCH_COLUMNS - 1))] for i in range(EPOCH_COLUMNS)})

    def cell(d: dict, seeds_ok: int) -> str:
        if not {"diag_cam_miou", "diag_pacam_miou"} <= d.keys():
            return "—"
        text = f"{round(100 * (d['diag_pacam_miou'] - d['diag_cam_miou']), 1) + 0.0:+.1f}"  # never "-0.0"
        if {"diag_cam_ratio", "diag_pacam_ratio"} <= d.keys():
            text += f" ({d['diag_cam_ratio']:.1f} / {d['diag_pacam_ratio']:.1f})"
        return text + (f" [{d['seeds']} of {seeds_ok}]" if d["seeds"] < seeds_ok else "")

    return ["", "## Per epoch: is the PACAM above the CAM it teaches?", "",
            "PACAM − CAM seed mIoU (points) on the training diagnostics' images (single scale, each map at its "
            "best threshold), and in brackets the contrast CAM / PACAM; mean over the seeds of each point ([n of m]: "
            f"only n of its m finished seeds reported that epoch; at most {EPOCH_COLUMNS} epochs shown, evenly "
            "spaced).", "",
            *markdown_table(["point", *(f"epoch {e}" for e in epochs)],
                            [[r["label"], *(cell(r["epochs"].get(e, {}), r["seeds_ok"]) for e in epochs)]
                             for r in rows])]


def _write_markdown(rows: list[dict], records: list[dict], spec: dict, best: dict | None, path: Location,
                    floors: dict | None = None) -> str:
    seeds = spec["seeds"]
    lines = [f"# Sweep `{location(spec['experiment_dir']).name}`: `{spec['module']}`", "", spec.get("title", ""), "",
             f"Search: {spec['search']}; seeds {seeds}; {len(records)} trials "
             f"({sum(r['status'] == 'ok' for r in records)} finished, {sum(r['status'] == 'error' for r in records)} "
             f"failed, {sum(r['status'] == 'unfinished' for r in records)} unfinished). Seed mIoU on the "
             f"{spec.get('eval_split', 'val')} split, background threshold swept."]
    if spec.get("resources"):
        r = spec["resources"]
        lines += ["", f"Each trial: {r['workers']} Ray Train workers x {r['per_worker']}, trial function {r['trial']}, "
                      f"at most {spec.get('max_concurrent')} trials at once."]
    if spec.get("raised"):
        lines += ["", f"Base config raised to the space's minimums: `{spec['raised']}`."]
    header = ["point", "seeds ok", "seed mIoU (%) mean ± std", "best bg threshold", "wall time (s)", "paper (%)"]
    lines += ["", *markdown_table(header, [
        [r["label"], f"{r['seeds_ok']}/{r['trials']}", pct_pm(r["seed_miou_mean"], r["seed_miou_std"]),
         _fmt(r["best_threshold"], "{:.2f}") or "—", _fmt(r["wall_seconds"], "{:.0f}") or "—",
         _fmt(r["paper_miou"], "{:.1f}") or "—"] for r in rows])]
    lines.append("")
    if best is not None:
        lines.append(f"Best: **{best['label']}**, {pct_pm(best['seed_miou_mean'], best['seed_miou_std'])} "
                     f"(config in `best_config.yaml`).")
    else:
        lines.append("No trial finished.")
    lines += _map_table(rows, floors)
    lines += _epoch_table(rows)
    lines += ["", f"Each trial's records (as it trained): `trials/<trial>/history.json` and `curves.png`; all "
                  f"of them in TensorBoard with `tensorboard --logdir {spec['experiment_dir']}/trials`."]
    failed = [r for r in records if r["status"] == "error"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- `{r['trial_id']}` ({r['label']}, seed {r['seed']}): {r['error']}" for r in failed]
    unfinished = [r for r in records if r["status"] == "unfinished"]
    if unfinished:
        lines += ["", f"{len(unfinished)} trials did not finish: continue with "
                      f"`python -m workflows.sweep --restore {spec['experiment_dir']}`."]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# -------------------------------------------------------------------------------------- plots


def _plot_bars(rows: list[dict], path: Location) -> str:
    from matplotlib.figure import Figure

    labels = [r["label"] for r in rows]
    ours = np.array([100 * r["seed_miou_mean"] if is_finite(r["seed_miou_mean"]) else np.nan for r in rows])
    err = np.array([100 * r["seed_miou_std"] if is_finite(r["seed_miou_std"]) else 0.0 for r in rows])
    paper = np.array([r["paper_miou"] if is_finite(r["paper_miou"]) else np.nan for r in rows])
    has_paper = bool(np.isfinite(paper).any())
    x = np.arange(len(rows))
    width = 0.4 if has_paper else 0.7
    fig = Figure(figsize=(max(4.0, 0.9 * len(rows) + 2), 4.0))
    ax = fig.add_subplot()
    ax.bar(x - (width / 2 if has_paper else 0), ours, width, yerr=err, capsize=3, label="this run")
    if has_paper:
        ax.bar(x + width / 2, paper, width, color="lightgray", edgecolor="gray", label="paper")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel("seed mIoU (%)")
    save_figure(fig, path, dpi=100)
    return str(path)


def _plot_heatmap(rows: list[dict], path: Location) -> str:
    from matplotlib.figure import Figure

    rows = [r for r in rows if None not in (r["point"].get("cpal.top_k"), r["point"].get("cpal.tau"))]
    ks = sorted({r["point"]["cpal.top_k"] for r in rows})
    taus = sorted({r["point"]["cpal.tau"] for r in rows})
    values = np.full((len(ks), len(taus)), np.nan)
    for r in rows:
        if is_finite(r["seed_miou_mean"]):
            values[ks.index(r["point"]["cpal.top_k"]), taus.index(r["point"]["cpal.tau"])] = 100 * r["seed_miou_mean"]
    fig = Figure(figsize=(1.1 * len(taus) + 2.5, 0.8 * len(ks) + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    for i in range(len(ks)):
        for j in range(len(taus)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(taus)), [str(t) for t in taus])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("tau (Eq. 4)")
    ax.set_ylabel("top-K (Eq. 6)")
    fig.colorbar(im, ax=ax, label="seed mIoU (%)")
    save_figure(fig, path, dpi=100)
    return str(path)
