"""Draw a training run's results, for a look at a glance.

    python plot_results.py runs/bp_run1 [--formats png pdf]

Reads history.csv, val_predictions.csv, test_predictions.csv and final_metrics.json from
the run folder and writes into ``<out_dir>/plots/``:

- ``learning_curves.png``: losses, validation MAE per target and learning rates per epoch;
- ``<split>_scatter.png``: predicted vs true BP per target, with the identity line;
- ``<split>_bland_altman.png``: mean of true and predicted vs their difference per target,
  with the mean error (ME) and the limits of agreement ME +/- 1.96 SD;
- ``<split>_by_band.png``: MAE per clinical band of the true value with each band's N, and
  the prediction interval's coverage per band;
- ``<split>_changes.png``: the four-quadrant plot of tracking, predicted vs true change of
  each later record from its subject's first (split.csv's subjects; the order of
  --calibration_order from args.json, else the ssoid), the exclusion zone shaded and the
  concordance rate in each title; not drawn (one printed line) where tracking was skipped.

Titles carry the metrics of final_metrics.json; any it lacks (a run from an older
version) are computed from the predictions by metrics.py. Titles break into lines that fit
the figure (or panel) width, figure legends take as many columns as fit, and the figure
grows taller by the lines this adds, so nothing is cut at any number of targets (the test
checks every drawn text at 1, 2, 5 and 8). train_bp.py calls ``plot_run``
at the end of training. Figures are drawn without pyplot (Agg canvas), so no display
and no global state are involved.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation

import metrics
import utils
from utils import UserError

SPLITS = ("val", "test")
FORMATS = ("png", "pdf", "svg")
PANEL_INCHES = 4.2   # width of one panel; a scatter panel also needs room for its title
TARGET_PANEL_HEIGHT = PANEL_INCHES + 0.5
MAX_COLS = 3
DPI = 130
TITLE_SEP = "   \u2022   "  # between the parts of a figure title; a line may break there
LEGEND_DROP_INCHES = 0.5  # from an axes' lower edge to a legend below its x label
FIT = 0.96  # share of the figure (or panel) width that a title or legend may take
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_mae_mean")


# ============================================================================= reading
def read_csv(path: str, dtype: Optional[dict] = None) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=dtype)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    if frame.empty:
        raise UserError(f"{path}: no rows")
    return frame


def numeric(frame: pd.DataFrame, columns: Sequence[str], path: str) -> np.ndarray:
    """``columns`` of ``frame`` as a float array; non-numbers are the user's error."""
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"{path}: empty, non-numeric or infinite values in {', '.join(columns)}")
    return values


def read_final_metrics(out_dir: str) -> dict:
    path = os.path.join(out_dir, "final_metrics.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: expected a JSON object")
    return report


def targets_of(columns: Sequence[str]) -> List[str]:
    """Targets named by prediction columns ``ssoid, <t>_true, <t>_pred, ...``."""
    return [c[:-len("_true")] for c in columns[1::2] if c.endswith("_true")]


def read_predictions(out_dir: str, split: str, target_cols: Optional[Sequence[str]]
                     ) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray]:
    """Target names, truths (N, T), predictions (N, T) and ssoids (N,) of one split's CSV."""
    path = os.path.join(out_dir, f"{split}_predictions.csv")
    frame = read_csv(path, dtype={"ssoid": str})
    targets = list(target_cols) if target_cols else targets_of(list(frame.columns))
    expected = ["ssoid"] + [f"{t}_{kind}" for t in targets for kind in ("true", "pred")]
    intervals = [f"{t}_{kind}" for t in targets for kind in ("lo", "hi")]  # train_bp --interval
    if not targets or list(frame.columns) not in (expected, expected + intervals):
        raise UserError(f"{path}: columns must be exactly {', '.join(expected)} (then "
                        f"<target>_lo, <target>_hi per target with intervals); "
                        f"got {', '.join(map(str, frame.columns))}")
    y_true = numeric(frame, [f"{t}_true" for t in targets], path)
    y_pred = numeric(frame, [f"{t}_pred" for t in targets], path)
    return targets, y_true, y_pred, frame["ssoid"].to_numpy()


def record_order(out_dir: str, ids: np.ndarray) -> Tuple[Optional[tuple], str]:
    """((subjects, order) of the records ``ids``, as train_bp.py's tracking block took
    them, or None) and why None: the subjects from split.csv, the order from the labels
    CSV's --calibration_order column named in args.json, else the ssoid."""
    split_csv = os.path.join(out_dir, "split.csv")
    if not os.path.isfile(split_csv):
        return None, f"{split_csv}: no such file"
    subjects = read_csv(split_csv, dtype=str).set_index("ssoid").loc[ids, "subject_id"]
    settings = utils.read_json(os.path.join(out_dir, "args.json"), "the run's args.json")
    column, labels_csv = settings.get("calibration_order"), settings.get("labels_csv")
    if not column:
        return (subjects.to_numpy(), ids), ""
    if not (labels_csv and os.path.isfile(labels_csv)):
        return None, f"labels CSV {labels_csv} (its --calibration_order {column}) not found"
    values = read_csv(labels_csv, dtype={"ssoid": str}).drop_duplicates("ssoid")\
        .set_index("ssoid").loc[ids, column]
    order = values if pd.api.types.is_numeric_dtype(values) else values.astype(str)
    return (subjects.to_numpy(), order.to_numpy()), ""


def read_history(out_dir: str) -> pd.DataFrame:
    path = os.path.join(out_dir, "history.csv")
    frame = read_csv(path)
    missing = [c for c in HISTORY_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    numeric(frame, HISTORY_COLUMNS, path)
    return frame


# ============================================================================= titles
def target_summary(block: dict, target: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """The run's reported metrics of one target, completed by metrics.py where absent."""
    reported = block.get("per_target", {}).get(target, {})
    return {**metrics.target_metrics(y_true, y_pred), **reported}


def scatter_title(target: str, m: dict) -> str:
    ci = m.get("mae_ci95")
    ci_text = f" (95% CI {ci[0]:.2f}\u2013{ci[1]:.2f})" if ci else ""
    return (f"{target}\nMAE {m['mae']:.2f} mmHg{ci_text}\n"
            f"r {m['pearson']:.3f}   R\u00b2 {m['r2']:.3f}   IEEE 1708: {m['ieee1708_grade']}")


def bland_altman_title(target: str, m: dict) -> str:
    low, high = m["me"] - 1.96 * m["sd"], m["me"] + 1.96 * m["sd"]
    within = "/".join(f"{100 * m[f'within_{k}']:.0f}" for k in metrics.WITHIN_MMHG)
    aami = "pass" if m["aami_pass"] else "fail"
    return (f"{target}\nME {m['me']:.2f}   SD {m['sd']:.2f}   LoA {low:.1f} to {high:.1f} mmHg\n"
            f"proportional bias: error = {m['ba_intercept']:.2f} {m['ba_slope']:+.3f} x mean\n"
            f"within 5/10/15 mmHg: {within} %\nBHS: {m['bhs_grade']}   AAMI: {aami}")


def split_title(split: str, block: dict, n_records: int) -> str:
    parts = [f"{split} split: {block.get('n_records', n_records)} records"]
    if "n_subjects" in block:
        parts[0] += f" of {block['n_subjects']} subjects"
    mean_mae = block.get("mean", {}).get("mae")
    base_mae = block.get("baseline", {}).get("mean", {}).get("mae")
    if mean_mae is not None:
        parts.append(f"mean MAE {mean_mae:.2f} mmHg")
    if base_mae is not None:
        parts.append(f"train-mean predictor {base_mae:.2f} mmHg")
    return TITLE_SEP.join(parts)


# ============================================================================= figures
def fitted_text(fig: Figure, text: str, fontsize: str, width_inches: float) -> str:
    """``text`` with line breaks so that no line is wider than ``width_inches`` where that
    can be: between the parts of a title first, then between the words of a part."""
    renderer, font = fig.canvas.get_renderer(), FontProperties(size=fontsize)

    def fits(line: str) -> bool:
        width = renderer.get_text_width_height_descent(line, font, ismath=False)[0]
        return width <= width_inches * fig.dpi

    def pack(items: List[str], sep: str) -> List[str]:
        lines: List[str] = []
        for item in items:
            if lines and fits(lines[-1] + sep + item):
                lines[-1] += sep + item
            else:
                lines.append(item)
        return lines

    lines = [line for given in text.split("\n") for line in pack(given.split(TITLE_SEP), TITLE_SEP)]
    return "\n".join(line if fits(line) else "\n".join(pack(line.split(" "), " "))
                     for line in lines)


def taller(fig: Figure, inches: float) -> None:
    """Add height for text laid out on more lines than the figure's size allowed for, so
    that the panels keep theirs."""
    fig.set_figheight(fig.get_figheight() + inches)


def figure_title(fig: Figure, title: str) -> None:
    """The figure's title, on as many lines as its width needs."""
    text = fig.suptitle(fitted_text(fig, title, "large", FIT * fig.get_figwidth()),
                        fontsize="large")
    taller(fig, text.get_text().count("\n") * 1.2 * text.get_fontsize() / 72)


def panel_title(ax, title: str) -> None:
    ax.set_title(fitted_text(ax.figure, title, "medium", FIT * PANEL_INCHES), fontsize="medium")


def new_figure(n_panels: int, panel_height: float) -> Tuple[Figure, list]:
    """A constrained-layout figure with one axes per panel in a grid; spare cells hidden."""
    cols = min(n_panels, MAX_COLS)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(PANEL_INCHES * cols, panel_height * rows + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def point_style(n: int) -> dict:
    """Marker size and opacity that keep a few hundred or tens of thousands of points readable."""
    return {"s": 10 if n <= 2000 else 3, "alpha": float(np.clip(400 / n, 0.15, 0.7)),
            "linewidths": 0, "rasterized": True, "color": "tab:blue"}


def figure_legend(fig: Figure, handles: list) -> None:
    """One legend below all panels, in as many columns as fit the figure's width; its
    point markers opaque however faint the points are."""
    renderer = fig.canvas.get_renderer()
    for ncols in range(len(handles), 0, -1):
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols)
        box = legend.get_window_extent(renderer)
        if ncols == 1 or box.width <= FIT * fig.bbox.width:
            break
        legend.remove()
    rows = math.ceil(len(handles) / ncols)
    taller(fig, box.height / fig.dpi * (rows - 1) / rows)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):  # the points' markers, not lines or areas
            handle.set_alpha(1.0)
            handle.set_sizes([20])


def scatter_figure(targets, y_true, y_pred, summaries, title) -> Figure:
    fig, axes = new_figure(len(targets), TARGET_PANEL_HEIGHT)
    for k, (ax, target) in enumerate(zip(axes, targets)):
        t, p = y_true[:, k], y_pred[:, k]
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        pad = 0.05 * (hi - lo) or 1.0
        lims = (lo - pad, hi + pad)
        points = ax.scatter(t, p, label="records", **point_style(len(t)))
        identity, = ax.plot(lims, lims, color="black", lw=1.2, label="identity (predicted = true)")
        ax.set(xlim=lims, ylim=lims, xlabel="true (mmHg)", ylabel="predicted (mmHg)")
        panel_title(ax, scatter_title(target, summaries[target]))
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
    figure_legend(fig, [points, identity])
    figure_title(fig, title)
    return fig


def bland_altman_figure(targets, y_true, y_pred, summaries, title) -> Figure:
    fig, axes = new_figure(len(targets), TARGET_PANEL_HEIGHT)
    for k, (ax, target) in enumerate(zip(axes, targets)):
        t, p = y_true[:, k], y_pred[:, k]
        m = summaries[target]
        points = ax.scatter((t + p) / 2, p - t, label="records", **point_style(len(t)))
        zero = ax.axhline(0.0, color="grey", lw=0.8, ls=":", label="zero error")
        me = ax.axhline(m["me"], color="tab:red", lw=1.5, label="mean error (ME)")
        for sign in (-1, 1):
            loa = ax.axhline(m["me"] + sign * 1.96 * m["sd"], color="tab:red", lw=1.2, ls="--",
                             label="ME \u00b1 1.96 SD (limits of agreement)")
        span = np.array([((t + p) / 2).min(), ((t + p) / 2).max()])
        trend, = ax.plot(span, m["ba_intercept"] + m["ba_slope"] * span, color="tab:blue",
                         lw=1.2, label="proportional bias (least-squares line)")
        ax.set(xlabel="mean of true and predicted (mmHg)", ylabel="predicted \u2212 true (mmHg)")
        panel_title(ax, bland_altman_title(target, m))
        ax.grid(alpha=0.3)
    figure_legend(fig, [points, me, loa, trend, zero])
    figure_title(fig, title)
    return fig


def by_band_figure(targets, block: dict, title: str) -> Figure:
    """MAE per band of the true value (bars, each with its N) and, with intervals, their
    coverage per band (points, right axis, the level dashed), from ``block["by_range"]``."""
    fig, axes = new_figure(len(targets), PANEL_INCHES * 0.9)
    intervals = block.get("intervals", {})
    for ax, target in zip(axes, targets):
        rng = block["by_range"].get(target, {})
        bands = rng.get("bands", [])
        x = np.arange(len(bands))
        mae = [b["mae"] or 0.0 for b in bands]
        ax.bar(x, mae, color="tab:blue", alpha=0.75, label="MAE")
        for k, b in enumerate(bands):
            ax.annotate(f"N {b['n']}", (k, mae[k]), ha="center", va="bottom", fontsize="x-small")
        ax.set_xticks(x, [b["band"] for b in bands], rotation=45, fontsize="small")
        ax.set(xlabel=f"true value band ({rng.get('band_set') or 'none'}, mmHg)",
               ylabel="MAE (mmHg)", title=target)
        ax.margins(y=0.15)
        cover = intervals.get("per_target", {}).get(target, {}).get("by_band")
        if cover:
            twin = ax.twinx()
            twin.plot(x, [c["coverage"] if c["n"] else np.nan for c in cover], "o",
                      color="tab:red", label="interval coverage")
            twin.axhline(intervals["level"], color="tab:red", ls="--", lw=1)
            twin.set(ylim=(0, 1.05), ylabel=f"coverage of the {intervals['level']:.0%} interval")
        ax.grid(alpha=0.3, axis="y")
    figure_title(fig, title)
    return fig


def change_title(target: str, entry: dict, zone: float) -> str:
    if "skipped" in entry:
        return f"{target}\n{entry['skipped']}"
    share = entry["concordance"]
    agree = ("no true change outside the zone" if share is None else
             f"{100 * share:.0f} % of {entry['n_concordance']} changes of \u2265 {zone:g} mmHg")
    change = entry["change"]
    return (f"{target}\nconcordance: {agree}\n"
            f"r of changes {change['pearson']:.3f}   change MAE {change['mae']:.2f} mmHg")


def changes_figure(targets, d_true: np.ndarray, d_pred: np.ndarray, tracking: dict,
                   title: str) -> Figure:
    """Predicted vs true change of each later record from its subject's first: a point
    concordant when the two changes share their sign, the exclusion zone (true changes
    smaller than ``tracking["exclusion_mmhg"]``, not counted) shaded, and the reported
    concordance rate in each panel's title."""
    fig, axes = new_figure(len(targets), TARGET_PANEL_HEIGHT)
    zone = tracking["exclusion_mmhg"]
    for k, (ax, target) in enumerate(zip(axes, targets)):
        dt, dp = d_true[:, k], d_pred[:, k]
        big, agree = metrics.concordant(dt, dp)
        style = point_style(len(dt))
        points = [ax.scatter(dt[mask], dp[mask], label=label, **{**style, "color": color})
                  for mask, label, color in ((agree, "concordant", "tab:green"),
                                             (big & ~agree, "discordant", "tab:red"),
                                             (~big, "in the exclusion zone", "grey"))]
        lim = 1.08 * max(float(np.abs(np.r_[dt, dp]).max()), 2 * zone)
        area = ax.axvspan(-zone, zone, color="grey", alpha=0.15, lw=0,
                          label=f"exclusion zone: |true change| < {zone:g} mmHg")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axvline(0.0, color="black", lw=0.8)
        identity, = ax.plot((-lim, lim), (-lim, lim), color="black", lw=1, ls="--",
                            label="identity (predicted = true change)")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xlabel="true change (mmHg)",
               ylabel="predicted change (mmHg)")
        panel_title(ax, change_title(target, tracking["per_target"][target], zone))
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
    figure_legend(fig, [*points, area, identity])
    figure_title(fig, title)
    return fig


def learning_curves_figure(history: pd.DataFrame, targets: Sequence[str],
                           best_epoch: Optional[int], title: str) -> Figure:
    fig, (loss_ax, mae_ax, lr_ax) = new_figure(3, PANEL_INCHES * 0.8)
    epoch = history["epoch"].to_numpy()
    style = {"marker": "o", "ms": 3}
    loss_ax.plot(epoch, history["train_loss"], label="train", **style)
    loss_ax.plot(epoch, history["val_loss"], label="validation", **style)
    loss_ax.set(ylabel="loss (normalised targets)", title="loss")
    mae_ax.plot(epoch, history["val_mae_mean"], color="black", lw=2.2, label="mean of targets",
                **style)
    for target in targets:
        if f"val_mae_{target}" in history:
            mae_ax.plot(epoch, history[f"val_mae_{target}"], lw=1, label=target, **style)
    mae_ax.set(ylabel="validation MAE (mmHg)", title="validation MAE")
    plot_learning_rates(lr_ax, history, style)
    for ax in (loss_ax, mae_ax, lr_ax):
        if best_epoch in set(epoch.tolist()):
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set(xlabel="epoch", xlim=(epoch.min() - 0.5, epoch.max() + 0.5))  # also for 1 epoch
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        # below the axes (so no legend ever covers a curve), at a fixed distance in inches
        # below the x label, which the constrained layout can make room for
        below = ax.transAxes + ScaledTranslation(0, -LEGEND_DROP_INCHES, fig.dpi_scale_trans)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below, ncols=2,
                  fontsize="small")
    legend = max((ax.get_legend() for ax in (loss_ax, mae_ax, lr_ax)), key=lambda g: len(g.texts))
    rows = math.ceil(len(legend.texts) / 2)
    row_inches = legend.get_window_extent(fig.canvas.get_renderer()).height / fig.dpi / rows
    taller(fig, max(0, rows - 2) * row_inches)  # the figure's height allows for two rows
    figure_title(fig, title)
    return fig


def plot_learning_rates(ax, history: pd.DataFrame, style: dict) -> None:
    """The learning rates each epoch trained at: from its first step (at epoch - 1) to its
    last step (at epoch); runs from before ``*_last`` columns show one point per epoch.
    Log scale when every plotted rate is > 0."""
    plotted = []
    epochs = history["epoch"].to_numpy(np.float64)
    for col, label in (("lr_backbone", "encoders"), ("lr_head", "head")):
        if col not in history:
            continue
        first = pd.to_numeric(history[col], errors="coerce").to_numpy(np.float64)
        if f"{col}_last" in history:
            last = pd.to_numeric(history[f"{col}_last"], errors="coerce").to_numpy(np.float64)
            x = np.column_stack([epochs - 1, epochs]).ravel()
            values = np.column_stack([first, last]).ravel()
        else:
            x, values = epochs, first
        ax.plot(x, values, label=label, **style)
        plotted.append(values)
    if plotted and all((v > 0).all() for v in plotted):
        ax.set_yscale("log")
    ax.set(ylabel="learning rate", title="learning rates")


# ============================================================================= writing
def save(fig: Figure, plot_dir: str, name: str, formats: Sequence[str]) -> List[str]:
    paths = []
    for fmt in formats:
        path = os.path.join(plot_dir, f"{name}.{fmt}")
        with utils.atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=DPI)
        paths.append(path)
    return paths


def run_title(out_dir: str, report: dict, n_epochs: int) -> str:
    name = os.path.basename(os.path.normpath(out_dir))
    title = f"{name}: {n_epochs} epoch" + "s" * (n_epochs != 1)
    best, best_mae = report.get("best_epoch"), report.get("val", {}).get("mean", {}).get("mae")
    if best is not None and best_mae is not None:
        title += f", best epoch {best} (validation MAE {best_mae:.2f} mmHg)"
    return title


def plot_run(out_dir: str, formats: Sequence[str] = ("png",)) -> List[str]:
    """Write every plot of the run in ``out_dir`` into ``out_dir/plots``; returns the paths.

    Every input is read and checked before anything is drawn, so bad input writes nothing.
    """
    report = read_final_metrics(out_dir)
    history = read_history(out_dir)
    targets, splits = report.get("target_cols"), {}
    for split in SPLITS:
        targets, y_true, y_pred, ids = read_predictions(out_dir, split, targets)
        splits[split] = (y_true, y_pred, ids)
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    paths = save(learning_curves_figure(history, targets, report.get("best_epoch"),
                                        run_title(out_dir, report, len(history))),
                 plot_dir, "learning_curves", formats)
    for split, (y_true, y_pred, ids) in splits.items():
        block = report.get(split, {})
        records, why = record_order(out_dir, ids) if "tracking" in block else (None, "")
        paths += plot_split(plot_dir, split, targets, y_true, y_pred, block, formats,
                            records, why)
    return paths


def plot_split(plot_dir: str, split: str, targets: Sequence[str], y_true: np.ndarray,
               y_pred: np.ndarray, block: dict, formats: Sequence[str],
               records: Optional[tuple] = None, why: str = "") -> List[str]:
    """``<split>_scatter``, ``<split>_bland_altman`` and (with the cuffless-BP blocks)
    ``<split>_by_band`` of one split's predictions, titled with its reported ``block`` of
    metrics, and with ``records`` = (subjects, order) of the rows ``<split>_changes``
    (``why`` says why a block with tracking has no ``records``); returns the paths."""
    summaries = {t: target_summary(block, t, y_true[:, k], y_pred[:, k])
                 for k, t in enumerate(targets)}
    title = split_title(split, block, len(y_true))
    paths = (save(scatter_figure(targets, y_true, y_pred, summaries, title), plot_dir,
                  f"{split}_scatter", formats)
             + save(bland_altman_figure(targets, y_true, y_pred, summaries, title), plot_dir,
                    f"{split}_bland_altman", formats))
    if "by_range" in block:  # runs from before the cuffless-BP blocks have none
        paths += save(by_band_figure(targets, block, title), plot_dir, f"{split}_by_band",
                      formats)
    tracking = block.get("tracking")
    if tracking is None:
        return paths
    skipped = tracking.get("skipped") or (None if records else why)
    if skipped:
        print(f"{split}_changes not drawn: {skipped}")
        return paths
    _, d_true, d_pred = metrics.subject_changes(y_true, y_pred, *records)
    title += (f"{TITLE_SEP}{tracking['n_changes']} changes from the first record of "
              f"{tracking['n_subjects']} subjects")
    return paths + save(changes_figure(targets, d_true, d_pred, tracking, title), plot_dir,
                        f"{split}_changes", formats)


# ============================================================================= CLI
def get_args_parser() -> utils.ArgumentParser:
    p = utils.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="a train_bp.py --out_dir")
    p.add_argument("--formats", nargs="+", default=["png"], choices=FORMATS,
                   help="file formats to write (pdf/svg scale for papers; png for a quick look)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = get_args_parser().parse_args(argv)
    if not os.path.isdir(args.out_dir):
        raise UserError(f"{args.out_dir}: no such directory")
    for path in plot_run(args.out_dir, args.formats):
        print(path)


if __name__ == "__main__":
    raise SystemExit(utils.run_cli(main))
