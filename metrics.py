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
  the covariates;
- with covariates, the ``gbm_baseline`` block: the same for gradient-boosted trees
  (LightGBM, ``fit_gbm``) on the same encoded covariates, fitted on the train split with
  the number of trees chosen on validation (early stopping), ``model_mae_diff`` = model
  MAE - GBM MAE with its paired interval from the same bootstrap: the strongest simple
  baseline of tabular data, which published feature models on small PPG sets are.

Edges are inclusive: an error of exactly 5 mmHg is within 5, a share of exactly 60 %
meets a 60 % threshold, an MAE of exactly 5 mmHg is IEEE grade A. A tolerance far below
any clinical resolution absorbs float rounding (128.3 - 123.3 is 5.000000000000014).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Optional, Sequence

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
# LightGBM for a few hundred to a few hundred thousand records of a handful of covariates:
# small trees and a slow rate, the number of trees chosen on validation. Deterministic:
# col-wise histograms (each feature's sums by one thread, so any thread count gives the
# same trees) and a fixed seed.
GBM_PARAMS = {"objective": "regression", "metric": "l1", "learning_rate": 0.05,
              "num_leaves": 15, "min_data_in_leaf": 20, "deterministic": True,
              "force_col_wise": True, "verbosity": -1}
GBM_MAX_TREES, GBM_PATIENCE = 2000, 100


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


# ----------------------------------------------------------------------------- boosted trees
class GBM(NamedTuple):
    """Fitted gradient-boosted trees, one LightGBM booster per target kept as its model
    text (plain data, for a checkpoint): ``gbm(x)``, (M, K) -> (M, T)."""
    models: List[str]
    n_trees: List[int]  # per target: the trees kept, chosen on validation

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import lightgbm  # imported by the runs that use it only: 2 s on a cold start
        x = np.asarray(x, dtype=np.float64)
        return np.column_stack([lightgbm.Booster(model_str=m).predict(x) for m in self.models])


def fit_gbm(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
            seed: int, threads: int = 1) -> GBM:
    """LightGBM (``GBM_PARAMS``) of every column of ``y_train`` (N, T) on ``x_train``
    (N, K), trees added until the validation MAE has not improved for ``GBM_PATIENCE``
    trees (at most ``GBM_MAX_TREES``), the best count kept. The same inputs, seed and
    any ``threads`` give the same trees."""
    import lightgbm

    params = {**GBM_PARAMS, "seed": int(seed), "num_threads": max(1, int(threads))}
    x_train, x_val = (np.asarray(a, dtype=np.float64) for a in (x_train, x_val))
    models, n_trees = [], []
    for k in range(np.shape(y_train)[1]):
        train = lightgbm.Dataset(x_train, np.asarray(y_train, dtype=np.float64)[:, k],
                                 params=params)
        val = lightgbm.Dataset(x_val, np.asarray(y_val, dtype=np.float64)[:, k],
                               reference=train)
        booster = lightgbm.train(params, train, GBM_MAX_TREES, valid_sets=[val],
                                 callbacks=[lightgbm.early_stopping(GBM_PATIENCE, verbose=False)])
        n_trees.append(int(booster.best_iteration))
        models.append(booster.model_to_string(num_iteration=booster.best_iteration))
    return GBM(models, n_trees)


# ----------------------------------------------------------------------------- split block
def _mase(mae: float, baseline_mae: float) -> Optional[float]:
    return float(mae / baseline_mae) if baseline_mae > 0 else None


def _add_mase(block: dict, baseline: dict, target_cols: Sequence[str]) -> None:
    for c in target_cols:
        block["per_target"][c]["mase"] = _mase(block["per_target"][c]["mae"],
                                               baseline["per_target"][c]["mae"])
    mases = [block["per_target"][c]["mase"] for c in target_cols]
    block["mean"]["mase"] = None if None in mases else float(np.mean(mases))


def _add_model_diff(block: dict, model: dict, ci: np.ndarray, target_cols: Sequence[str]) -> None:
    """A fitted baseline's ``model_mae_diff`` (model MAE - its MAE) per target with the
    paired interval ``ci`` (T, 2), and of the mean MAE."""
    for k, c in enumerate(target_cols):
        block["per_target"][c]["model_mae_diff"] = (model["per_target"][c]["mae"]
                                                    - block["per_target"][c]["mae"])
        block["per_target"][c]["model_mae_diff_ci95"] = ci[k].tolist()
    block["mean"]["model_mae_diff"] = model["mean"]["mae"] - block["mean"]["mae"]


def split_metrics(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                  target_cols: Sequence[str], train_mean: Sequence[float],
                  n_boot: int = N_BOOT, seed: int = BOOT_SEED,
                  covariate_pred: Optional[np.ndarray] = None,
                  gbm_pred: Optional[np.ndarray] = None) -> Dict[str, object]:
    """One ``val``/``test`` block of final_metrics.json (the caller adds ``loss``).

    ``y_true``/``y_pred``: (N, T) in mmHg; ``subjects``: (N,) subject of each record;
    ``train_mean``: (T,) train-split mean of each target, the baseline's constant
    prediction (or (N, T) per-record baseline predictions, as ``calibrated_block`` uses);
    ``covariate_pred`` (N, T), the ridge-on-covariates predictions, adds the
    ``covariate_baseline`` block, ``gbm_pred`` (N, T), the boosted trees', the
    ``gbm_baseline`` block. All intervals come from one subject bootstrap (adding a
    baseline changes no other interval). Raises ``ValueError`` for mismatched shapes, no
    records or non-finite values.
    """
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    subjects = np.asarray(subjects).astype(str)
    base = np.broadcast_to(np.asarray(train_mean, dtype=np.float64), t.shape)
    if len(subjects) != len(t):
        raise ValueError(f"{len(subjects)} subjects for {len(t)} records")
    fitted = {name: _checked(t, np.reshape(pred, (-1, n_t)))[1] for name, pred in
              (("covariate_baseline", covariate_pred), ("gbm_baseline", gbm_pred))
              if pred is not None}
    errors = [np.abs(p - t), np.abs(base - t)] + [np.abs(f - t) for f in fitted.values()]
    diffs = [errors[0] - e for e in errors[2:]]  # model minus each fitted baseline, by record
    ci = bootstrap_mae_ci(np.concatenate(errors + diffs, axis=1), subjects, n_boot, seed)
    blocks = {"model": regression_metrics(t, p, target_cols),
              "baseline": regression_metrics(t, base, target_cols),
              **{name: regression_metrics(t, f, target_cols) for name, f in fitted.items()}}
    for j, block in enumerate(blocks.values()):
        for k, c in enumerate(target_cols):
            block["per_target"][c]["mae_ci95"] = ci[j * n_t + k].tolist()
    _add_mase(blocks["model"], blocks["baseline"], target_cols)
    for i, name in enumerate(fitted):
        _add_mase(blocks[name], blocks["baseline"], target_cols)
        _add_model_diff(blocks[name], blocks["model"], ci[(len(blocks) + i) * n_t:][:n_t],
                        target_cols)
    model = blocks.pop("model")
    return {"n_records": int(len(t)), "n_subjects": int(len(np.unique(subjects))),
            **model, **blocks, "bootstrap": {"resamples": int(n_boot), "seed": int(seed),
                                             "unit": "subject"}}


# ----------------------------------------------------------------------------- calibration
def later_records(subjects: Sequence, order: Sequence) -> Optional[tuple]:
    """(rows of every record but each subject's first, the row of that subject's first
    record for each), ``order`` (N,) sorting a subject's records (ties keep the row
    order); None when no subject has two records."""
    subjects = np.asarray(subjects).astype(str)
    rows = np.lexsort((np.arange(len(subjects)), np.asarray(order), subjects))
    first = np.r_[True, subjects[rows][1:] != subjects[rows][:-1]]
    if first.all():
        return None
    # for each later record, the position of its subject's first record in sorted order
    start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    return rows[~first], rows[start][~first]


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
    pairs = later_records(subjects, order)
    if pairs is None:
        return None
    kept, owner = pairs
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


# ============================================================================= cuffless-BP evaluation
# What a reviewer of a cuffless device asks beyond the mean error (docs/metrics.md has the
# rationale of each number): error by BP range, ISO 81060-2:2018 criterion 2 and its
# test-population audit, conformal prediction intervals, tracking of within-subject
# changes, subject-level and subgroup results, and an affine recalibration.

# Lower edges (mmHg) of the clinical bands of a value; a band holds lo <= value < next lo.
BAND_EDGES = {
    "sbp": (100, 120, 130, 140, 160, 180),
    "dbp": (60, 80, 90, 100),
    "mbp": (70, 80, 90, 100, 110),
    "pp": (30, 40, 50, 60, 70),
}
BAND_KEYS = ("mae", "me", "sd", "within_5", "within_10", "within_15")
ISO_TOLERANCE_MMHG, ISO_PROBABILITY = 10.0, 0.85
ISO_MIN_SUBJECTS, ISO_MIN_READINGS, ISO_MIN_SEX_SHARE = 85, 255, 0.30
# (name, band set, ">=" or "<=", limit mmHg, minimum share of the reference readings)
ISO_BP_RANGES = (("sbp_ge_160", "sbp", ">=", 160.0, 0.05), ("sbp_le_100", "sbp", "<=", 100.0, 0.05),
                 ("sbp_ge_140", "sbp", ">=", 140.0, 0.20), ("dbp_le_60", "dbp", "<=", 60.0, 0.05),
                 ("dbp_ge_100", "dbp", ">=", 100.0, 0.05), ("dbp_ge_85", "dbp", ">=", 85.0, 0.20))
TRACKING_EXCLUSION_MMHG = 5.0
CHANGE_EDGES = (5, 10, 15, 20)  # bands of |true change from the subject's first record|
AGE_EDGES = (40, 50, 60, 70)
CONSTANT_TRUTH = ("the truth never changes within a subject (one cuff reading per subject?), "
                  "so there are no BP changes to track")


def band_set(target: str) -> Optional[str]:
    """The band set a target's name implies: sbp, dbp, mbp or pp anywhere in it (case
    ignored, tried in that order, so ``left_arm_mbp`` is mbp); None when none fits."""
    name = target.lower()
    return next((s for s in BAND_EDGES if s in name), None)


def band_labels(edges: Sequence[float]) -> List[str]:
    """``<e0``, ``e0-e1``, ..., ``>=eK``: one label per band of ``band_index``."""
    return ([f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
            + [f">={edges[-1]:g}"])


def band_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Band of each value: 0 below ``edges[0]``, k for edges[k-1] <= value < edges[k]."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")


def regression_to_mean(y_true: np.ndarray, y_pred: np.ndarray) -> tuple:
    """(slope of the least-squares line of prediction on truth, SD(pred) / SD(true)); both
    1 for a perfect model and 0 for a constant one, (None, None) when the truth is constant."""
    t, p = _checked(y_true, y_pred)
    if np.ptp(t) == 0:
        return None, None
    tc = t - t.mean()
    return float(np.sum(tc * (p - p.mean())) / np.sum(tc ** 2)), float(p.std() / t.std())


def range_block(y_true: np.ndarray, y_pred: np.ndarray, bands: str) -> dict:
    """Per band of the true value (set ``bands``, a key of ``BAND_EDGES``): its N and, when
    N > 0, MAE, ME, SD and the shares within 5/10/15 mmHg (null for an empty band, which is
    listed all the same); and the regression-to-the-mean numbers of the whole target."""
    t, p = _checked(y_true, y_pred)
    edges = BAND_EDGES[bands]
    index = band_index(t, edges)
    rows = []
    for k, label in enumerate(band_labels(edges)):
        inside = index == k
        row = {"band": label, "n": int(inside.sum()), **dict.fromkeys(BAND_KEYS)}
        if inside.any():
            m = target_metrics(t[inside], p[inside])
            row.update({key: m[key] for key in BAND_KEYS})
        rows.append(row)
    slope, ratio = regression_to_mean(t, p)
    return {"band_set": bands, "bands": rows, "pred_slope": slope, "sd_ratio": ratio}


def target_band_sets(target_cols: Sequence[str],
                     given: Optional[Sequence[str]] = None) -> List[Optional[str]]:
    """Each target's band set: ``given`` (one per target, ``auto`` for the name's) or the
    name's (``band_set``)."""
    given = list(given) if given else ["auto"] * len(target_cols)
    return [band_set(c) if g == "auto" else g for c, g in zip(target_cols, given)]


def by_range(y_true: np.ndarray, y_pred: np.ndarray, target_cols: Sequence[str],
             band_sets: Sequence[Optional[str]]) -> dict:
    """``range_block`` per target; a target without a band set gets a note instead."""
    t, p = np.reshape(y_true, (-1, len(target_cols))), np.reshape(y_pred, (-1, len(target_cols)))
    return {c: (range_block(t[:, k], p[:, k], s) if s else
                {"band_set": None, "note": f"{c} names none of {', '.join(BAND_EDGES)}: no band "
                                           f"set (--bands sets one)"})
            for k, (c, s) in enumerate(zip(target_cols, band_sets))}


def worst_band(block: dict) -> Optional[dict]:
    """The non-empty band with the highest MAE of a ``range_block`` (None without bands)."""
    rows = [r for r in block.get("bands", []) if r["n"]]
    return max(rows, key=lambda r: r["mae"]) if rows else None


# ----------------------------------------------------------------------------- subjects
def subject_means(values: np.ndarray, subjects: Sequence) -> tuple:
    """(sorted subject names, (S, T) mean of each column of ``values`` (N, T) per subject)."""
    values = np.asarray(values, dtype=np.float64).reshape(len(values), -1)
    names, code = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    sums = np.zeros((len(names), values.shape[1]))
    np.add.at(sums, code, values)
    return names, sums / np.bincount(code, minlength=len(names))[:, None]


def subject_level(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                  target_cols: Sequence[str]) -> dict:
    """``regression_metrics`` of each subject's mean prediction against its mean truth."""
    names, t = subject_means(y_true, subjects)
    p = subject_means(y_pred, subjects)[1]
    return {"n_subjects": int(len(names)), **regression_metrics(t, p, target_cols)}


# ----------------------------------------------------------------------------- ISO 81060-2
def iso_sd_limit(me: float) -> Optional[float]:
    """ISO 81060-2:2018 criterion 2: the largest SD of the per-subject mean errors allowed
    at mean error ``me``, the sigma for which P(|e| <= 10 mmHg) = 0.85 with e ~ N(me,
    sigma) (the rule behind the standard's table: 6.95 at 0, 4.79 at 5 mmHg). None when
    |me| > 5 mmHg, where criterion 1 fails and the table ends."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    me = abs(float(me))
    if me > AAMI_MAX_ABS_ME + MMHG_TOL:
        return None
    tol = ISO_TOLERANCE_MMHG

    def excess(sigma: float) -> float:
        return norm.cdf((tol - me) / sigma) - norm.cdf((-tol - me) / sigma) - ISO_PROBABILITY

    return float(brentq(excess, 1e-3, 10 * tol, xtol=1e-9))


def iso_criteria(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence) -> dict:
    """Criteria 1 and 2 of ISO 81060-2:2018 for one target. Criterion 2 averages each
    subject's errors and compares the SD (ddof=1) of those means with ``iso_sd_limit`` of
    their mean (the same ME as criterion 1 when every subject has as many readings)."""
    t, p = _checked(y_true, y_pred)
    e = p - t
    means = subject_means(e, subjects)[1][:, 0]
    me2 = float(means.mean())
    sd2 = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
    limit = iso_sd_limit(me2)
    me1, sd1 = float(e.mean()), float(np.std(e, ddof=1)) if e.size > 1 else 0.0
    return {"criterion_1": {"me": me1, "sd": sd1, "pass": aami_pass(me1, sd1)},
            "criterion_2": {"n_subjects": int(len(means)), "me": me2, "sd": sd2, "sd_limit": limit,
                            "pass": bool(limit is not None and sd2 <= limit + MMHG_TOL)}}


def _share_check(values: np.ndarray, op: str, limit: float, minimum: float) -> dict:
    hit = values >= limit - MMHG_TOL if op == ">=" else values <= limit + MMHG_TOL
    share = float(hit.mean())
    return {"n": int(hit.sum()), "share": share, "minimum_share": minimum,
            "pass": share >= minimum - SHARE_TOL}


def population_audit(subjects: Sequence, sbp: Optional[np.ndarray] = None,
                     dbp: Optional[np.ndarray] = None, sex: Optional[Sequence] = None) -> dict:
    """The test population against ISO 81060-2:2018's minimums (clause 5.1.2 and 5.1.3
    as implemented here, see docs/metrics.md): subjects, readings, each sex's share of
    the subjects, and the shares of the reference readings (``sbp``/``dbp`` truths, one
    per record) in the high and low ranges. Each check has its number and ``pass``; one
    that cannot be made (no SBP target, no sex column) is listed in ``not_assessed``.
    ``pass`` holds when every check was made and passed."""
    subjects = np.asarray(subjects).astype(str)
    n_subj = int(len(np.unique(subjects)))
    checks = {"subjects": {"n": n_subj, "minimum": ISO_MIN_SUBJECTS,
                           "pass": n_subj >= ISO_MIN_SUBJECTS},
              "readings": {"n": int(len(subjects)), "minimum": ISO_MIN_READINGS,
                           "pass": len(subjects) >= ISO_MIN_READINGS}}
    not_assessed = []
    if sex is None:
        not_assessed.append("sex: no sex column")
    else:
        checks["sex"] = sex_check(subjects, sex)
    for name, which, op, limit, minimum in ISO_BP_RANGES:
        values = sbp if which == "sbp" else dbp
        if values is None:
            not_assessed.append(f"{name}: no {which.upper()} target")
        else:
            checks[name] = _share_check(np.asarray(values, dtype=np.float64), op, limit, minimum)
    return {"checks": checks, "not_assessed": not_assessed,
            "pass": not not_assessed and all(c["pass"] for c in checks.values())}


def sex_check(subjects: np.ndarray, sex: Sequence) -> dict:
    """Each sex's share of the subjects (a subject's first value counts; blank is
    ``missing``); passes with exactly two sexes, each at least 30 %."""
    frame = {}
    for s, v in zip(subjects, _group_text(sex)):
        frame.setdefault(s, v)
    values, counts = np.unique(list(frame.values()), return_counts=True)
    shares = {str(v): float(c / len(frame)) for v, c in zip(values, counts)}
    known = {v: s for v, s in shares.items() if v != "missing"}
    return {"shares": shares, "minimum_share": ISO_MIN_SEX_SHARE,
            "pass": len(known) == 2 and all(s >= ISO_MIN_SEX_SHARE - SHARE_TOL
                                            for s in known.values())}


def iso_block(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
              target_cols: Sequence[str], band_sets: Sequence[Optional[str]],
              sex: Optional[Sequence] = None) -> dict:
    """``iso_criteria`` of every SBP- and DBP-like target and the ``population_audit``
    (reference readings: the first SBP-like and DBP-like target). A criterion 1 passed on
    a population that fails the audit carries a ``note`` saying so."""
    n_t = len(target_cols)
    t, p = np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t))
    first = {s: t[:, band_sets.index(s)] if s in band_sets else None for s in ("sbp", "dbp")}
    audit = population_audit(subjects, first["sbp"], first["dbp"], sex)
    per = {}
    for k, (c, s) in enumerate(zip(target_cols, band_sets)):
        if s not in ("sbp", "dbp"):
            continue
        per[c] = iso_criteria(t[:, k], p[:, k], subjects)
        if per[c]["criterion_1"]["pass"] and not audit["pass"]:
            failed = [n for n, ch in audit["checks"].items() if not ch["pass"]]
            per[c]["note"] = ("criterion 1 passes, but on a test population that does not meet "
                              "ISO 81060-2's minimums (" + ", ".join(failed + audit["not_assessed"])
                              + "): not a validation")
    return {"per_target": per, "population": audit}


# ----------------------------------------------------------------------------- intervals
def conformal_quantile(scores: np.ndarray, level: float) -> Optional[float]:
    """The ceil((n + 1) level)-th smallest of n scores (split conformal); None when that
    rank exceeds n (too few scores for ``level``: the interval would be unbounded)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * level - 1e-9)
    return float(scores[rank - 1]) if rank <= len(scores) else None


def subject_scores(abs_residuals: np.ndarray, subjects: Sequence) -> np.ndarray:
    """Each subject's largest |residual|: the exchangeable unit's conformity score."""
    _, code = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
    out = np.full(int(code.max()) + 1 if len(code) else 0, -np.inf)
    np.maximum.at(out, code, np.asarray(abs_residuals, dtype=np.float64))
    return out


def fit_conformal(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                  target_cols: Sequence[str], level: float,
                  mondrian: Optional[Sequence[Optional[str]]] = None) -> dict:
    """Split-conformal calibration on (validation) records, subjects as the exchangeable
    unit: per target, ``quantile`` of the subjects' largest |pred - true| (so a new
    subject's records all lie within pred +/- quantile with probability >= ``level``).
    ``mondrian`` (band set per target, None for none) adds one quantile per band of the
    prediction, over each subject's records in that band; a band with too few subjects
    uses the overall quantile (``fallback``). Plain data, for the checkpoint."""
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    subjects = np.asarray(subjects).astype(str)
    out = {"level": float(level), "unit": "subject", "score": "max |pred - true| per subject",
           "n_subjects": int(len(np.unique(subjects))), "per_target": {}}
    for k, c in enumerate(target_cols):
        r = np.abs(p[:, k] - t[:, k])
        entry = {"quantile": conformal_quantile(subject_scores(r, subjects), level)}
        sets = mondrian[k] if mondrian else None
        if sets and entry["quantile"] is not None:
            entry["mondrian"] = mondrian_quantiles(r, p[:, k], subjects, sets, level,
                                                   entry["quantile"])
        out["per_target"][c] = entry
    return out


def mondrian_quantiles(abs_res: np.ndarray, pred: np.ndarray, subjects: np.ndarray,
                       bands: str, level: float, overall: float) -> dict:
    index = band_index(pred, BAND_EDGES[bands])
    quantiles, counts, fallback = [], [], []
    for k in range(len(BAND_EDGES[bands]) + 1):
        inside = index == k
        q = conformal_quantile(subject_scores(abs_res[inside], subjects[inside]), level) \
            if inside.any() else None
        counts.append(int(len(np.unique(subjects[inside]))))
        fallback.append(q is None)
        quantiles.append(overall if q is None else q)
    return {"band_set": bands, "bands": band_labels(BAND_EDGES[bands]), "quantiles": quantiles,
            "n_subjects": counts, "fallback": fallback}


def conformal_intervals(y_pred: np.ndarray, calibration: dict,
                        target_cols: Sequence[str]) -> tuple:
    """(lo, hi), each (N, T): pred -/+ the target's quantile (its predicted band's with
    Mondrian); NaN where the calibration had too few subjects for its level."""
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1, len(target_cols))
    half = np.full(p.shape, np.nan)
    for k, c in enumerate(target_cols):
        entry = calibration["per_target"][c]
        if entry["quantile"] is None:
            continue
        half[:, k] = entry["quantile"]
        if "mondrian" in entry:
            m = entry["mondrian"]
            half[:, k] = np.asarray(m["quantiles"])[band_index(p[:, k], BAND_EDGES[m["band_set"]])]
    return p - half, p + half


def interval_block(y_true: np.ndarray, lo: np.ndarray, hi: np.ndarray, subjects: Sequence,
                   target_cols: Sequence[str], band_sets: Sequence[Optional[str]],
                   calibration: dict) -> dict:
    """Coverage (share of records with lo <= true <= hi), share of subjects with every
    record covered, and mean width, per target and per band of the true value."""
    n_t = len(target_cols)
    t = np.reshape(np.asarray(y_true, dtype=np.float64), (-1, n_t))
    lo, hi = np.reshape(lo, (-1, n_t)), np.reshape(hi, (-1, n_t))
    subjects = np.asarray(subjects).astype(str)
    out = {"level": calibration["level"], "calibrated_on_subjects": calibration["n_subjects"],
           "per_target": {}}
    for k, c in enumerate(target_cols):
        if np.isnan(lo[:, k]).any():
            out["per_target"][c] = {"note": f"too few calibration subjects "
                                            f"({calibration['n_subjects']}) for level "
                                            f"{calibration['level']:g}: no interval"}
            continue
        inside = (t[:, k] >= lo[:, k] - MMHG_TOL) & (t[:, k] <= hi[:, k] + MMHG_TOL)
        width = hi[:, k] - lo[:, k]
        missed = subject_scores((~inside).astype(np.float64), subjects)
        entry = {"coverage": float(inside.mean()), "mean_width": float(width.mean()),
                 "subject_coverage": float(np.mean(missed == 0))}
        if band_sets[k]:
            edges = BAND_EDGES[band_sets[k]]
            index = band_index(t[:, k], edges)
            entry["by_band"] = [_band_coverage(label, inside[index == b], width[index == b])
                                for b, label in enumerate(band_labels(edges))]
        out["per_target"][c] = entry
    return out


def _band_coverage(label: str, inside: np.ndarray, width: np.ndarray) -> dict:
    some = inside.size > 0
    return {"band": label, "n": int(inside.size),
            "coverage": float(inside.mean()) if some else None,
            "mean_width": float(width.mean()) if some else None}


# ----------------------------------------------------------------------------- tracking
def tracking_block(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence, order: Sequence,
                   target_cols: Sequence[str]) -> dict:
    """How well predictions follow each subject's BP changes from its first record (in
    ``order``; IEEE 1708a, ESH 2023), per target over the later records of subjects with
    two or more: ``change`` (``target_metrics``' MAE, ME, SD and Pearson r of the predicted
    against the true change), the four-quadrant ``concordance`` (share of changes whose
    sign the prediction gets right, among true changes of at least
    ``TRACKING_EXCLUSION_MMHG``; a predicted change of 0 is discordant) and
    ``by_change_size``: per band of |true change|, N, the MAE of the reading and of the
    change. Skipped, with the reason, where no subject has two records or the truth never
    changes."""
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    changes = subject_changes(t, p, subjects, order)
    if changes is None:
        return {"skipped": "no subject has two or more records"}
    kept, d_true, d_pred = changes
    out = {"n_subjects": int(len(np.unique(np.asarray(subjects).astype(str)[kept]))),
           "n_changes": int(len(kept)), "exclusion_mmhg": TRACKING_EXCLUSION_MMHG,
           "per_target": {}}
    for k, c in enumerate(target_cols):
        dt, dp = d_true[:, k], d_pred[:, k]
        if not dt.any():
            out["per_target"][c] = {"skipped": CONSTANT_TRUTH}
            continue
        out["per_target"][c] = change_metrics(dt, dp, np.abs(p[kept, k] - t[kept, k]))
    return out


def subject_changes(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                    order: Sequence) -> Optional[tuple]:
    """(rows of every record but each subject's first in ``order``, their true and their
    predicted changes from that first record, (M, T) each); None when no subject has two
    records. ``tracking_block`` and the change plot use it."""
    pairs = later_records(subjects, order)
    if pairs is None:
        return None
    kept, owner = pairs
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    return kept, t[kept] - t[owner], p[kept] - p[owner]


def concordant(dt: np.ndarray, dp: np.ndarray) -> tuple:
    """(changes outside the exclusion zone, those of them whose predicted change has the
    true one's sign), boolean (M,) each: the four-quadrant concordance's counts."""
    big = np.abs(dt) >= TRACKING_EXCLUSION_MMHG - MMHG_TOL
    return big, big & (np.sign(dp) == np.sign(dt))


def change_metrics(dt: np.ndarray, dp: np.ndarray, reading_abs_error: np.ndarray) -> dict:
    """``tracking_block``'s numbers of one target from the true and predicted changes."""
    m = target_metrics(dt, dp)
    big, agree = concordant(dt, dp)
    index = band_index(np.abs(dt), CHANGE_EDGES)
    sizes = []
    for b, label in enumerate(band_labels(CHANGE_EDGES)):
        inside = index == b
        some = bool(inside.any())
        sizes.append({"change": label, "n": int(inside.sum()),
                      "reading_mae": float(reading_abs_error[inside].mean()) if some else None,
                      "change_mae": float(np.abs(dp - dt)[inside].mean()) if some else None})
    return {"n_changed": int(np.count_nonzero(dt)),
            "change": {key: m[key] for key in ("mae", "me", "sd", "pearson")},
            "concordance": float(agree.sum() / big.sum()) if big.any() else None,
            "n_concordance": int(big.sum()), "by_change_size": sizes}


# ----------------------------------------------------------------------------- subgroups
def _group_text(values: Sequence) -> List[str]:
    """Values as group names: numbers without a trailing .0, blanks as ``missing``."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
            out.append("missing")
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v))
    return out


def age_groups(age: Sequence) -> List[str]:
    """Age bands (``AGE_EDGES``) of numeric ages; blank or non-numeric is ``missing``."""
    a = np.array([_number(v) for v in age], dtype=np.float64)
    labels = band_labels(AGE_EDGES)
    index = band_index(np.nan_to_num(a), AGE_EDGES)
    return [labels[i] if np.isfinite(x) else "missing" for i, x in zip(index, a)]


def _number(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def subgroup_block(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                   target_cols: Sequence[str], groups: Dict[str, Sequence[str]],
                   n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> dict:
    """Per grouping (e.g. ``{"sex": [...], "age": age_groups(...)}``, a group name per
    record) and group: records, subjects and per target the MAE with its
    subject-bootstrap 95 % interval (``bootstrap_mae_ci`` within the group)."""
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    subjects = np.asarray(subjects).astype(str)
    out = {}
    for name, labels in groups.items():
        labels = np.asarray(labels).astype(str)
        rows = []
        for g in sorted(set(labels.tolist())):
            inside = labels == g
            err = np.abs(p[inside] - t[inside])
            ci = bootstrap_mae_ci(err, subjects[inside], n_boot, seed)
            rows.append({"group": g, "n_records": int(inside.sum()),
                         "n_subjects": int(len(np.unique(subjects[inside]))),
                         "per_target": {c: {"mae": float(err[:, k].mean()),
                                            "mae_ci95": ci[k].tolist()}
                                        for k, c in enumerate(target_cols)}})
        out[name] = rows
    return out


# ----------------------------------------------------------------------------- recalibration
def fit_affine(y_true: np.ndarray, y_pred: np.ndarray, target_cols: Sequence[str]) -> dict:
    """Per target the least-squares map truth ~ slope x pred + intercept (fit it on the
    validation split only); slope 1 and the mean offset when the predictions are constant.
    Plain data, for the checkpoint."""
    n_t = len(target_cols)
    t, p = _checked(np.reshape(y_true, (-1, n_t)), np.reshape(y_pred, (-1, n_t)))
    out = {}
    for k, c in enumerate(target_cols):
        pc = p[:, k] - p[:, k].mean()
        slope = float(np.sum(pc * (t[:, k] - t[:, k].mean())) / np.sum(pc ** 2)) \
            if np.ptp(p[:, k]) > 0 else 1.0
        out[c] = {"slope": slope, "intercept": float(t[:, k].mean() - slope * p[:, k].mean())}
    return out


def apply_affine(y_pred: np.ndarray, affine: dict, target_cols: Sequence[str]) -> np.ndarray:
    """``y_pred`` (N, T) through each target's ``fit_affine`` map."""
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1, len(target_cols))
    slope = np.array([affine[c]["slope"] for c in target_cols])
    return p * slope + np.array([affine[c]["intercept"] for c in target_cols])


def recalibration_block(y_true: np.ndarray, raw: np.ndarray, affine: dict,
                        target_cols: Sequence[str], applied: bool,
                        decimals: Optional[int] = None) -> dict:
    """The split's ``regression_metrics`` of the raw and of the affine-recalibrated
    predictions side by side, with the map (fitted on validation) and whether the run's
    reported predictions are the recalibrated ones (``applied``)."""
    mapped = apply_affine(raw, affine, target_cols)
    if decimals is not None:
        mapped = np.round(mapped, decimals)
    return {"fitted_on": "val", "applied": bool(applied), "map": affine,
            "raw": regression_metrics(y_true, raw, target_cols),
            "affine": regression_metrics(y_true, mapped, target_cols)}


# ----------------------------------------------------------------------------- one split
def clinical_blocks(y_true: np.ndarray, y_pred: np.ndarray, subjects: Sequence,
                    target_cols: Sequence[str], band_sets: Sequence[Optional[str]],
                    order: Optional[Sequence] = None, sex: Optional[Sequence] = None,
                    age: Optional[Sequence] = None,
                    intervals: Optional[tuple] = None) -> dict:
    """The cuffless-BP blocks of one split: ``by_range``, ``iso81060_2`` (its audit of
    the sexes from ``sex``, one value per record), ``subject_level``, ``tracking``
    (subjects' records in ``order``, default the row order), ``subgroups`` by ``sex`` and
    by band of ``age`` (either may be None) and with ``intervals`` = (lo, hi,
    calibration) the ``intervals`` coverage."""
    order = np.arange(len(subjects)) if order is None else order
    groups = {}
    if sex is not None:
        groups["sex"] = _group_text(sex)
    if age is not None:
        groups["age"] = age_groups(age)
    out = {"by_range": by_range(y_true, y_pred, target_cols, band_sets),
           "iso81060_2": iso_block(y_true, y_pred, subjects, target_cols, band_sets, sex),
           "subject_level": subject_level(y_true, y_pred, subjects, target_cols),
           "tracking": tracking_block(y_true, y_pred, subjects, order, target_cols)}
    if groups:
        out["subgroups"] = subgroup_block(y_true, y_pred, subjects, target_cols, groups)
    if intervals is not None:
        lo, hi, calibration = intervals
        out["intervals"] = interval_block(y_true, lo, hi, subjects, target_cols, band_sets,
                                          calibration)
    return out
