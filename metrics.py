"""The project's one metrics module: every number in final_metrics.json, the training
log and the plots comes from here (training, prediction, plotting and tests share it).

Errors are e = pred - true in mmHg. Per target:

- CONTRACT section 3: ``mae``, ``rmse``, ``pearson``, ``r2``, ``me``, ``sd`` (ddof=1);
- Bland-Altman proportional bias: ``ba_slope``, ``ba_intercept`` of the line
  error = intercept + slope x (mean of true and predicted);
- clinical: ``within_5/10/15`` (share of records with |e| <= 5/10/15 mmHg), ``bhs_grade``
  (British Hypertension Society), ``aami_pass`` (ANSI/AAMI/ISO 81060-2 criterion 1:
  |ME| <= 5 and SD <= 8), ``ieee1708_grade`` (IEEE 1708 MAE classes);
- per split (``split_metrics``): ``mae_ci95``, a 95 % bootstrap interval of the MAE that
  resamples subjects, and ``mase``, the MAE relative to the constant train-mean predictor,
  whose own metrics form the ``baseline`` block;
- ``calibrated`` (``calibrated_block``): one-point calibration, as for cuffless devices used
  with one cuff reading per person (ISO 81060-3): for each subject with two or more
  records, the first record (in a given order) gives an offset true - predicted per target
  that is added to the predictions of that subject's other records; the usual metrics are
  computed over those other records alone, beside the train-mean baseline calibrated the
  same way (which then predicts the calibration record's own value);
- with covariates, the ``covariate_baseline`` block: the same metrics for a ridge
  regression of each target on the encoded covariates, fitted on the train split alone
  (``fit_ridge``), and ``model_mae_diff`` = model MAE - ridge MAE with its paired
  subject-bootstrap interval: an interval below 0 says the waveforms add something beyond
  the covariates.

Edges are inclusive: an error of exactly 5 mmHg is within 5, a share of exactly 60 %
meets a 60 % threshold, an MAE of exactly 5 mmHg is IEEE grade A. A tolerance far below
any clinical resolution absorbs float rounding (128.3 - 123.3 is 5.000000000000014).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import numpy as np

METRIC_KEYS = ("mae", "rmse", "pearson", "r2", "me", "sd")
BLAND_ALTMAN_KEYS = ("ba_slope", "ba_intercept")
CLINICAL_KEYS = ("within_5", "within_10", "within_15", "bhs_grade", "aami_pass", "ieee1708_grade")
MEAN_KEYS = ("mae", "rmse", "pearson", "r2")
WITHIN_MMHG = (5, 10, 15)
# Cumulative % of records within 5/10/15 mmHg that a grade needs (all three must hold).
BHS_THRESHOLDS = (("A", (60, 85, 95)), ("B", (50, 75, 90)), ("C", (40, 65, 85)))
IEEE1708_LIMITS = (("A", 5.0), ("B", 6.0), ("C", 7.0))
AAMI_MAX_ABS_ME, AAMI_MAX_SD = 5.0, 8.0
MMHG_TOL = 1e-6     # added to every mmHg limit: float noise, not a clinical margin
SHARE_TOL = 1e-9    # subtracted from every share threshold; shares of N <= 1e8 differ by more
N_BOOT, BOOT_SEED = 1000, 0
CALIBRATION_MEASURES_NOTHING = (
    "every subject's targets are the same in all its records (one cuff reading per "
    "subject?): a calibrated prediction is then that reading plus the model's "
    "within-subject scatter, so one-point calibration measures nothing here and no "
    "metrics or grades are reported")
RIDGE_ALPHA = 1.0


# ----------------------------------------------------------------------------- clinical rules
def within(errors: np.ndarray, mmhg: float) -> float:
    """Share (0..1) of records with |error| <= ``mmhg``; the limit itself counts."""
    return float(np.mean(np.abs(np.asarray(errors, dtype=np.float64)) <= mmhg + MMHG_TOL))


def bhs_grade(within_5: float, within_10: float, within_15: float) -> str:
    """British Hypertension Society grade from the shares (0..1) within 5/10/15 mmHg."""
    shares = (within_5, within_10, within_15)
    for grade, percents in BHS_THRESHOLDS:
        if all(s >= p / 100.0 - SHARE_TOL for s, p in zip(shares, percents)):
            return grade
    return "D"


def aami_pass(me: float, sd: float) -> bool:
    """ANSI/AAMI/ISO 81060-2 criterion 1: |mean error| <= 5 and SD <= 8 mmHg."""
    return bool(abs(me) <= AAMI_MAX_ABS_ME + MMHG_TOL and sd <= AAMI_MAX_SD + MMHG_TOL)


def ieee1708_grade(mae: float) -> str:
    """IEEE 1708 class: A for MAE <= 5, B <= 6, C <= 7 mmHg, else D."""
    for grade, limit in IEEE1708_LIMITS:
        if mae <= limit + MMHG_TOL:
            return grade
    return "D"


# ----------------------------------------------------------------------------- per target
def _checked(y_true, y_pred) -> tuple:
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.size == 0:
        raise ValueError(f"metrics need equal, non-empty shapes; got {t.shape} and {p.shape}")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("metrics need finite truths and predictions (NaN or Inf found)")
    return t, p


def target_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> Dict[str, object]:
    """CONTRACT metrics and clinical fields of one target (1-D arrays, mmHg).

    ``pearson`` is 0.0 when either side is constant; ``r2`` is 0.0 when the truth is
    constant; ``sd`` (ddof=1) is 0.0 for a single record.
    """
    t, p = _checked(y_true, y_pred)
    e = p - t
    sst = float(np.sum((t - t.mean()) ** 2))
    # constancy is tested exactly: the SD of a constant column can be 1e-16, not 0
    if np.ptp(t) > 0 and np.ptp(p) > 0:
        pearson = float(np.mean((t - t.mean()) * (p - p.mean())) / (t.std() * p.std()))
    else:
        pearson = 0.0
    out = {
        "mae": float(np.mean(np.abs(e))),
        "rmse": float(np.sqrt(np.mean(e ** 2))),
        "pearson": pearson,
        "r2": float(1.0 - np.sum(e ** 2) / sst) if sst > 0 else 0.0,
        "me": float(np.mean(e)),
        "sd": float(np.std(e, ddof=1)) if e.size > 1 else 0.0,
    }
    out["ba_slope"], out["ba_intercept"] = proportional_bias(t, p)
    out.update({f"within_{k}": within(e, k) for k in WITHIN_MMHG})
    out["bhs_grade"] = bhs_grade(out["within_5"], out["within_10"], out["within_15"])
    out["aami_pass"] = aami_pass(out["me"], out["sd"])
    out["ieee1708_grade"] = ieee1708_grade(out["mae"])
    return out


def proportional_bias(y_true: np.ndarray, y_pred: np.ndarray) -> tuple:
    """Bland-Altman proportional bias: (slope, intercept) of the least-squares line of the
    error ``pred - true`` on the mean ``(pred + true) / 2``; a slope away from 0 means the
    error grows with the pressure. (0.0, mean error) when the means are all equal."""
    t, p = _checked(y_true, y_pred)
    m, e = (p + t) / 2, p - t
    if np.ptp(m) == 0:
        return 0.0, float(e.mean())
    mc = m - m.mean()
    slope = float(np.sum(mc * (e - e.mean())) / np.sum(mc ** 2))
    return slope, float(e.mean() - slope * m.mean())


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                       target_cols: Sequence[str]) -> Dict[str, dict]:
    """``{"per_target": {col: target_metrics}, "mean": {mae, rmse, pearson, r2}}`` for (N, T)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), len(target_cols))
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), len(target_cols))
    per = {c: target_metrics(y_true[:, k], y_pred[:, k]) for k, c in enumerate(target_cols)}
    mean = {m: float(np.mean([per[c][m] for c in target_cols])) for m in MEAN_KEYS}
    return {"per_target": per, "mean": mean}


# ----------------------------------------------------------------------------- bootstrap
def bootstrap_mae_ci(abs_errors: np.ndarray, subjects: Sequence, n_boot: int = N_BOOT,
                     seed: int = BOOT_SEED) -> np.ndarray:
    """(T, 2) percentile-2.5/97.5 interval of the MAE of each column of ``abs_errors`` (N, T)
    (any per-record values: a column of differences of absolute errors gives the interval
    of the difference of two MAEs, paired by record).

    Each resample draws as many subjects as there are, with replacement, and pools all
    their records, so records of one subject move together. Vectorised: a resample is a
    weight per subject applied to per-subject sums. Subjects are sorted before drawing,
    so row order does not change the draws (only the last bits of the sums). One subject
    gives the interval [MAE, MAE].
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    abs_errors = np.asarray(abs_errors, dtype=np.float64)
    _, code = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    n_subj = int(code.max()) + 1
    if n_subj == 1:  # every resample is the sample itself; skip the rounding of the sums
        mae = np.array([np.mean(np.ascontiguousarray(col)) for col in abs_errors.T])
        return np.stack([mae, mae], axis=1)
    sums = np.zeros((n_subj, abs_errors.shape[1]))
    np.add.at(sums, code, abs_errors)
    counts = np.bincount(code, minlength=n_subj).astype(np.float64)
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // n_subj)  # bounds the (chunk, n_subjects) weight matrix
    maes = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        draws = rng.integers(0, n_subj, size=(rows, n_subj), dtype=np.int32)
        draws += (n_subj * np.arange(rows, dtype=np.int32))[:, None]  # one bin range per row
        weights = np.bincount(draws.ravel(), minlength=rows * n_subj)
        weights = weights.reshape(rows, n_subj).astype(np.float64)
        maes.append((weights @ sums) / (weights @ counts)[:, None])
    return np.percentile(np.concatenate(maes), [2.5, 97.5], axis=0).T


# ----------------------------------------------------------------------------- ridge
class Ridge(NamedTuple):
    """A fitted ridge regression: ``ridge(x)`` = x @ coef + intercept, (M, K) -> (M, T)."""
    coef: np.ndarray  # (K, T)
    intercept: np.ndarray  # (T,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef + self.intercept


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = RIDGE_ALPHA) -> Ridge:
    """Closed-form ridge regression of every column of ``y`` (N, T) on ``x`` (N, K).

    Minimises ||y - x b - c||^2 + alpha ||b||^2 per target, the intercept c unpenalised
    (x and y are centred first).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc = x - x_mean
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - y_mean))
    return Ridge(coef, y_mean - x_mean @ coef)


# ----------------------------------------------------------------------------- split block
def _mase(mae: float, baseline_mae: float) -> Optional[float]:
    return float(mae / baseline_mae) if baseline_mae > 0 else None


def _add_mase(block: dict, baseline: dict, target_cols: Sequence[str]) -> None:
    for c in target_cols:
        block["per_target"][c]["mase"] = _mase(block["per_target"][c]["mae"],
                                               baseline["per_target"][c]["mae"])
    mases = [block["per_target"][c]["mase"] for c in target_cols]
    block["mean"]["mase"] = None if None in mases else float(np.mean(mases))


def split_metrics(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                  target_cols: Sequence[str], train_mean: Sequence[float],
                  n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                  covariate_pred: Optional[np.ndarray] = None) -> Dict[str, object]:
    """One ``val``/``test`` block of final_metrics.json (the caller adds ``loss``).

    ``y_true``/``y_pred``: (N, T) in mmHg; ``subjects``: (N,) subject of each record;
    ``train_mean``: (T,) train-split mean of each target, the baseline's constant
    prediction (or (N, T) per-record baseline predictions, as ``calibrated_block`` uses);
    ``covariate_pred`` (N, T), the ridge-on-covariates predictions, adds the
    ``covariate_baseline`` block. All intervals come from one subject bootstrap. Raises
    ``ValueError`` for mismatched shapes, no records or non-finite values.
    """
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    subjects = np.asarray(subjects).astype(str)
    base = np.broadcast_to(np.asarray(train_mean, dtype=np.float64), t.shape)
    if len(subjects) != len(t):
        raise ValueError(f"{len(subjects)} subjects for {len(t)} records")
    columns = [np.abs(p - t), np.abs(base - t)]
    if covariate_pred is not None:
        _, ridge = _checked(t, np.reshape(covariate_pred, (-1, n_t)))
        columns += [np.abs(ridge - t), np.abs(p - t) - np.abs(ridge - t)]
    ci = bootstrap_mae_ci(np.concatenate(columns, axis=1), subjects, n_boot, seed)
    blocks = {"model": regression_metrics(t, p, target_cols),
              "baseline": regression_metrics(t, base, target_cols)}
    if covariate_pred is not None:
        blocks["covariate_baseline"] = regression_metrics(t, ridge, target_cols)
    for j, block in enumerate(blocks.values()):
        for k, c in enumerate(target_cols):
            block["per_target"][c]["mae_ci95"] = ci[j * n_t + k].tolist()
    _add_mase(blocks["model"], blocks["baseline"], target_cols)
    if covariate_pred is not None:
        cov = blocks["covariate_baseline"]
        _add_mase(cov, blocks["baseline"], target_cols)
        for k, c in enumerate(target_cols):
            cov["per_target"][c]["model_mae_diff"] = (blocks["model"]["per_target"][c]["mae"]
                                                      - cov["per_target"][c]["mae"])
            cov["per_target"][c]["model_mae_diff_ci95"] = ci[3 * n_t + k].tolist()
        cov["mean"]["model_mae_diff"] = blocks["model"]["mean"]["mae"] - cov["mean"]["mae"]
    model = blocks.pop("model")
    return {"n_records": int(len(t)), "n_subjects": int(len(np.unique(subjects))),
            **model, **blocks, "bootstrap": {"resamples": int(n_boot), "seed": int(seed),
                                             "unit": "subject"}}


# ----------------------------------------------------------------------------- calibration
def calibrated_block(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                     order: Sequence, target_cols: Sequence[str], n_boot: int = N_BOOT,
                     seed: int = BOOT_SEED) -> Optional[Dict[str, object]]:
    """One-point calibration metrics (see the module docstring), or None when no subject
    has two records.

    ``order`` (N,) sorts each subject's records (the first is the calibration record; ties
    keep the row order). The block has ``split_metrics``' fields over the calibrated
    records, its ``baseline`` being the train mean calibrated alike (that is, each
    subject's calibration-record truth), plus
    ``n_calibration_records`` (one per calibrated subject), ``n_subjects_left_out``
    (subjects with a single record, which cannot be calibrated) and ``bp_changes``, per
    target the calibrated records whose truth differs from their calibration record's.

    Where no truth changes (every record of a subject shares one cuff reading), a
    calibrated prediction is the subject's truth plus the model's within-subject scatter:
    the metrics would measure nothing, so the block holds the counts, ``informative``
    false and a ``note`` instead of metrics and grades. A target that alone never changes
    is named in ``note``.
    """
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    subjects = np.asarray(subjects).astype(str)
    rows = np.lexsort((np.arange(len(t)), np.asarray(order), subjects))  # subject, then order
    first = np.r_[True, subjects[rows][1:] != subjects[rows][:-1]]
    if first.all():
        return None
    # for each later record, the position of its subject's first record in sorted order
    start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    kept, owner = rows[~first], rows[start][~first]
    n_calibrated = int(len(np.unique(subjects[kept])))
    changes = (t[kept] != t[owner]).sum(axis=0)
    counts = {"n_calibration_records": n_calibrated,
              "n_subjects_left_out": int(len(np.unique(subjects)) - n_calibrated),
              "bp_changes": {c: int(n) for c, n in zip(target_cols, changes)}}
    if not changes.any():
        return {"n_records": int(len(kept)), **counts, "informative": False,
                "note": CALIBRATION_MEASURES_NOTHING}
    block = split_metrics(t[kept], p[kept] + (t[owner] - p[owner]), subjects[kept],
                          target_cols, t[owner], n_boot, seed)
    block.update(counts, informative=True)
    constant = [c for c, n in zip(target_cols, changes) if n == 0]
    if constant:
        block["note"] = (f"{', '.join(constant)}: the truth never changes within a subject, "
                         f"so its calibrated metrics measure nothing")
    return block
