"""Physiology from the raw waveforms: signal conditioning, beat detection, heart rate and its
variability, pulse arrival time (PAT), PPG pulse morphology and signal quality. Pure functions
on arrays (no files, no CLI), called by ``prepare_kailuan_npz.py``'s workers (the columns of
CONTRACT section 6) and by ``predict_bp.py --h5_path``:

    feats = record_features(ecg, ppg, fs_ecg, fs_ppg)  # {column: float}, keys FEATURE_COLUMNS
    rows = condition(batch, fs, "ecg")                  # zero-phase band-pass, 1-D or 2-D

Time axis: sample i of a signal lies at i / fs seconds from the record's start; the ECG and the
PPG cover the same span and may have different rates and lengths (fs = samples / record seconds).

Conditioning (``condition``): Butterworth band-pass as second-order sections, run forwards and
backwards (zero phase, so no fiducial point moves; the magnitude response is squared):
- ECG: 0.67-40 Hz, order 4 (ECGFounder's band: 0.67 Hz = 40 bpm keeps the QRS-T while removing
  baseline wander, 40 Hz drops EMG and mains), plus a notch (``scipy.signal.iirnotch``, Q = 30,
  i.e. 1.7 Hz wide at 50 Hz) at ``mains_hz`` when it lies below fs / 2.
- PPG: 0.5-8 Hz, order 2 (the band and order of Elgendi et al. 2013, for which their peak
  detector below was designed; a low order rings least on the slow diastolic part).
When fs is too low for a high cut, the high cut becomes 0.9 x Nyquist (40 Hz at fs = 62.5 Hz
becomes 28.1 Hz); fs below 2 x 0.67 / 0.9 Hz (ECG) raises ValueError. The filtering is
``scipy.signal.sosfiltfilt(sos, x, padtype="even", padlen=...)``'s computation, bit for bit
(steady-state initial conditions, forward and backward ``sosfilt``), with the initial conditions
cached per design: sosfiltfilt solves for them on every call, 0.7 of its 1.2 ms on a 15 s ECG.
Edges: each row is extended by its mirror image (even extension) of ``EDGE_PAD_S`` = 3 s (at
least sosfiltfilt's default 3 x the filter length), or by n - 1 samples when it is shorter, so
that most of the slow 0.5-0.67 Hz high-pass transient falls outside the record.
sosfiltfilt's default (odd extension by 3 x the filter length, 15 samples for the PPG band)
leaves a short record mostly transient: on 8-minute ICU PPGs (BIDMC, at 500 Hz) a 2.1 s span
filtered alone differed from the same span cut from the filtered minute by a median 28 % of
its RMS (15 s: 10 %), with the mirror padding by 14 % (15 s: 5 %); an odd extension of
seconds was worse (37 %), as it continues the record's slope (docs/physiology.md, "Filter
edges on short records"). An empty row stays empty. Output float64, same shape, along the
last axis (a 2-D batch is filtered row by row).

Beats. One detector of each kind, on the conditioned signal:
- ECG R peaks: neurokit2's default detector (``nk.ecg_findpeaks``, method "neurokit": QRS
  complexes where the smoothed absolute gradient exceeds 1.5 x its 0.75 s moving average, the R
  peak being the most prominent maximum inside; Makowski et al. 2021). It looks for maxima, so
  an ECG whose QRS points down is flipped first (``upright``: nk.ecg_invert's rule, the sample of
  largest magnitude negative in most 2 s windows).
- PPG systolic peaks: ``nk.ppg_findpeaks``, method "elgendi" (Elgendi et al. 2013: moving
  averages of the squared positive signal over 111 ms and 667 ms).
- PPG foot of each pulse: the intersecting-tangent point (Chiu et al. 1991; Kazanavicius et al.
  2005): the tangent at the steepest upslope between the preceding trough (the minimum since the
  previous systolic peak, at most 2 s back) and the systolic peak, intersected with the
  horizontal through that trough; sub-sample. A pulse whose minimum is the first sample of that
  window (the record's start, or a previous peak the signal never fell below) has no foot. On the
  synthetic cohort this foot lies about 15 ms after the generating pulse onset, whose rise starts
  flat (see the benchmark).
A signal's beats are accepted only with at least 3 detections, a median inter-beat interval of
300-2000 ms (200-30 bpm) and a template SQI (below) of at least ``MIN_SQI`` = 0.8; otherwise the
signal counts as having no beats (n_beats 0 and every feature derived from it NaN, its SQI
included), since the detectors also "find" beats in noise: band-limited and white noise scores
up to 0.70 (150 draws at 125-500 Hz), while clean synthetic and ICU signals score 0.84-1.00 and
the ICU windows below 0.8 are artefact (Orphanidou et al. 2015 accept from 0.86). A record too
short for 3 whole beats (shorter than 4 median intervals, such as 2.1 s segments) needs only 2
detections, still with an SQI of at least 0.8: that of two beats (below); 2.1 s of band-limited
noise then passes in up to 6 % of draws (0 % in 15 s records), so features of such short
records are only as trustworthy as the recording, and one beat is never enough. A signal that
is None, empty, shorter than 1 s, not finite everywhere, or flat is treated the same way. Nothing
here raises for such signals; invalid arguments (fs <= 0 for a given signal, an unknown kind, a
signal that is not one 1-D row) raise ValueError.

Features (``FEATURE_COLUMNS``; NaN where they cannot be computed, never a stand-in value; the
three counts are 0 then):
- ``hr_bpm``: 60000 / median R-R interval (ms), from the ECG only (NaN without an ECG; the PPG
  pulse rate is the separate ``ppg_rate_bpm``). Intervals outside 300-2000 ms (missed or extra
  beats) are dropped first, here and for HRV.
- ``hrv_sdnn_ms``: SD (ddof 1) of the R-R intervals (needs 2); ``hrv_rmssd_ms``: root mean
  square of the differences of successive intervals, both kept (needs 1). Ultra-short-term HRV:
  the Task Force (1996) defines both on >= 5 min; on 10-30 s RMSSD still tracks the 5 min value,
  SDNN much less (Munoz et al. 2015).
- ``pat_foot_ms``, ``pat_peak_ms``, ``pat_beats``: each R peak is paired with the first PPG foot
  at least 80 ms after it if that foot lies at most 600 ms after it; a foot claimed by two R
  peaks (a missed PPG pulse) stays with the later one; unpaired R peaks are left out.
  pat_foot_ms = median R -> foot delay, pat_peak_ms = median R -> systolic peak delay of the same
  pulses, pat_beats = the number of pairs (PAT = pre-ejection period + pulse transit time;
  Mukkamala et al. 2015).
- ``sqi_ecg``, ``sqi_ppg`` in [0, 1]: template matching (Orphanidou et al. 2015): the mean
  Pearson correlation of each beat with the sample-wise median beat, clipped at 0; NaN with fewer
  than 2 whole beats. Two beats: the correlation between them (each against their mean would
  score about 0.71 for two unrelated segments). ECG beats: windows of the median R-R length
  centred on the R peaks. PPG beats: from 10 % of the median foot-to-foot interval before each
  (sub-sample) foot to the next foot, linearly interpolated; the same segments make the median
  pulse below (one whole pulse is its own median). When only the first pulse is whole and the
  record ends inside the second, after at least half a pulse, the two are compared over the
  part both have.
- ``n_beats_ecg``, ``n_beats_ppg``: accepted R peaks and systolic peaks.
- ``ppg_rate_bpm``: 60000 / median systolic peak-to-peak interval (same 300-2000 ms rule).
PPG morphology, on the median pulse after subtracting the straight line through its foot and its
last sample (the next foot), so the pulse stands on a zero baseline; A = its maximum after the
foot (the systolic peak); times in ms after the foot:
- ``ppg_rise_time_ms``: foot -> systolic peak (crest time; Alty et al. 2007).
- ``ppg_width25_ms``, ``ppg_width50_ms``, ``ppg_width75_ms``: pulse width at 25/50/75 % of A
  (crossings interpolated between samples; Awad et al. 2007).
- ``ppg_notch_ms``, ``ppg_notch_rel_height``: the dicrotic notch = the lowest point between the
  systolic peak and the diastolic peak, where the diastolic peak is the first local maximum after
  the systolic peak, in the first 70 % of the pulse, with a prominence of at least 1 % of A
  (``scipy.signal.find_peaks``); the notch must lie above the baseline; relative height = notch /
  A. NaN when there is no such diastolic peak (the notch has filled in, as in stiff arteries): a
  notch is never replaced by an inflection point.
- ``ppg_reflection_index``: diastolic peak / A (Chowienczyk et al. 1999); NaN without a notch.
- ``ppg_area_ratio``: area of the pulse above its baseline from the foot to the systolic peak,
  divided by the area from the systolic peak to the next foot. Split at the systolic peak, always,
  not at the notch (the inflection point area ratio of Wang et al. 2009): on the band-passed pulse
  the area after the notch is often near zero, so that ratio was unstable (3-80 on the synthetic
  cohort), and a notch is rarely found in the ICU windows.
- ``ppg_b_a``, ``ppg_d_a``: second-derivative (SDPPG/APG) ratios (Takazawa et al. 1998), the
  derivative from a cubic Savitzky-Golay fit over 50 ms (a differentiator: the raw second
  difference of the 8 Hz pulse is dominated by the noise above it). a = the largest maximum
  before the systolic peak (from the median pulse's start, 10 % of an interval before the
  foot); b = the lowest point after a; c, d = the next maximum and minimum
  after b with a prominence of at least 5 % of a. b, c, d must lie before the notch (without a
  notch: in the first half of the pulse); d/a is NaN when c or d is not there (the synthetic
  pulses have none before their notch).
Morphology is measured on the 0.5-8 Hz conditioned pulse, so values are specific to this
conditioning: compare them within the pipeline, not with numbers from other filters. Left out:
stiffness index (needs the subject's height) and perfusion index (needs the DC level, which the
band-pass removes).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import scipy.ndimage
import scipy.signal
from scipy.integrate import trapezoid

FEATURE_COLUMNS = [
    "hr_bpm", "hrv_sdnn_ms", "hrv_rmssd_ms", "pat_foot_ms", "pat_peak_ms", "pat_beats",
    "sqi_ecg", "sqi_ppg", "n_beats_ecg", "n_beats_ppg", "ppg_rate_bpm",
    "ppg_rise_time_ms", "ppg_width25_ms", "ppg_width50_ms", "ppg_width75_ms",
    "ppg_notch_ms", "ppg_notch_rel_height", "ppg_reflection_index", "ppg_area_ratio",
    "ppg_b_a", "ppg_d_a",
]
COUNT_COLUMNS = ("pat_beats", "n_beats_ecg", "n_beats_ppg")  # whole numbers, 0 if none
MORPHOLOGY_COLUMNS = FEATURE_COLUMNS[FEATURE_COLUMNS.index("ppg_rise_time_ms"):]

BANDS = {"ecg": (0.67, 40.0, 4), "ppg": (0.5, 8.0, 2)}  # low Hz, high Hz, Butterworth order
HIGH_CUT_MAX = 0.9  # of Nyquist, when fs is too low for the band's high cut
NOTCH_Q = 30.0
MAINS_HZ = 50.0  # the default notch (Europe, Asia); 60 in the Americas
IBI_RANGE_MS = (300.0, 2000.0)  # plausible inter-beat intervals (200-30 bpm)
PAT_RANGE_MS = (80.0, 600.0)
MIN_BEATS = 3
MIN_SQI = 0.8
MIN_SECONDS = 1.0
POLARITY_WINDOW_S = 2.0
NOTCH_PROMINENCE = 0.01  # of the pulse amplitude
DIA_SEARCH = 0.7  # the diastolic peak lies in this first share of the pulse
PRE_FOOT = 0.1  # PPG beats start this share of the foot-to-foot interval before the foot
APG_WINDOW_S = 0.05  # Savitzky-Golay window of the second derivative
APG_PROMINENCE = 0.05  # of the a wave
EDGE_PAD_S = 3.0  # mirror padding of each conditioned row, seconds (see the module docstring)


# ----------------------------------------------------------------------------- conditioning
@functools.lru_cache(maxsize=64)
def _design(kind: str, fs: float, mains_hz: Optional[float]):
    """(sos, steady-state initial conditions per section, edge padding) of a band."""
    if kind not in BANDS:
        raise ValueError(f"kind must be one of {sorted(BANDS)}, got {kind!r}")
    if not fs > 0:
        raise ValueError(f"fs must be > 0, got {fs}")
    low, high, order = BANDS[kind]
    high = min(high, HIGH_CUT_MAX * fs / 2)
    if high <= low:
        raise ValueError(f"fs = {fs} Hz is too low for the {kind} band ({low} Hz high-pass)")
    sos = scipy.signal.butter(order, [low, high], btype="bandpass", fs=fs, output="sos")
    if kind == "ecg" and mains_hz and mains_hz < fs / 2:
        b, a = scipy.signal.iirnotch(mains_hz, NOTCH_Q, fs=fs)
        sos = np.vstack([sos, scipy.signal.tf2sos(b, a)])
    # sosfiltfilt's default padding (3 x the filter length) is far shorter than the
    # high-pass settles; seconds of mirror image put most of its transient outside the record
    default = 3 * (2 * len(sos) + 1 - min((sos[:, 2] == 0).sum(), (sos[:, 5] == 0).sum()))
    return sos, scipy.signal.sosfilt_zi(sos), max(default, int(round(EDGE_PAD_S * fs)))


def condition(x, fs: float, kind: str, mains_hz: Optional[float] = MAINS_HZ) -> np.ndarray:
    """``x`` (1-D row or 2-D batch, filtered along the last axis) band-passed for ``kind``
    ('ecg' or 'ppg', see the module docstring), zero phase, as float64.

    ``mains_hz`` (ECG only): the notch frequency, None or 0 for none; skipped when it is not
    below fs / 2.
    """
    x = np.asarray(x, dtype=np.float64)
    sos, zi, padlen = _design(kind, float(fs), float(mains_hz) if mains_hz else None)
    n = x.shape[-1]
    if n == 0:
        return x.copy()
    pad = min(padlen, n - 1)  # shorter rows are padded by what they have
    ext = np.concatenate([x[..., pad:0:-1], x, x[..., -2:-pad - 2:-1]], axis=-1)
    zi = zi.reshape((len(sos),) + (1,) * (x.ndim - 1) + (2,))
    y, _ = scipy.signal.sosfilt(sos, ext, axis=-1, zi=zi * ext[None, ..., :1])
    y, _ = scipy.signal.sosfilt(sos, y[..., ::-1], axis=-1, zi=zi * y[None, ..., -1:])
    return np.ascontiguousarray(y[..., ::-1][..., pad:pad + n])


# ----------------------------------------------------------------------------- beats
def _neurokit():
    """neurokit2, imported on first use: its import takes ~4 s (scikit-learn, matplotlib,
    pandas), which scripts that import this module but compute no features should not pay."""
    import neurokit2
    return neurokit2


@dataclass
class Beats:
    """Accepted beats of one signal: fiducial positions in samples (float) and quality.

    ``peaks``: R peaks or PPG systolic peaks; ``feet``: PPG feet (NaN where a pulse has none;
    empty for ECG); ``sqi``: template SQI (NaN if not computable); ``template``: the median
    beat, for PPG from ``template_foot`` samples before the foot to the next foot; ``fs``: the
    signal's rate.
    """
    fs: float
    peaks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    feet: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sqi: float = np.nan
    template: np.ndarray = field(default_factory=lambda: np.zeros(0))
    template_foot: int = 0

    def intervals_ms(self) -> np.ndarray:
        """Peak-to-peak intervals in ms, NaN where outside ``IBI_RANGE_MS``."""
        if len(self.peaks) < 2:
            return np.zeros(0)
        return plausible_ms(np.diff(self.peaks) * (1000.0 / self.fs))


def plausible_ms(ibi: np.ndarray) -> np.ndarray:
    """Inter-beat intervals (ms) with NaN where outside ``IBI_RANGE_MS``."""
    return np.where((ibi >= IBI_RANGE_MS[0]) & (ibi <= IBI_RANGE_MS[1]), ibi, np.nan)


def _usable(x, fs: float) -> Optional[np.ndarray]:
    """``x`` as a float64 row, or None when it cannot hold beats (None, too short, non-finite
    or flat)."""
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"a record's signal must be one row (1-D), got shape {x.shape}")
    if x.size < MIN_SECONDS * fs or not np.isfinite(x).all():
        return None
    if np.ptp(x) <= 1e-9 * max(1.0, np.abs(x).max()):
        return None
    return x


def _segments(signal: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows ``signal[s : s + length]`` for the (possibly fractional) ``starts`` whose window
    lies wholly inside the signal, linearly interpolated."""
    starts = starts[(starts >= 0) & (starts + length - 1 <= len(signal) - 1)]
    pos = starts[:, None] + np.arange(length)[None, :]
    return np.interp(pos.ravel(), np.arange(len(signal)), signal).reshape(pos.shape)


def template_sqi(segments: np.ndarray) -> Tuple[float, np.ndarray]:
    """(SQI, median beat): mean Pearson correlation of each beat (row) with the sample-wise
    median beat, clipped at 0. Two beats: the correlation between them instead (either beat
    against their mean scores about 0.71 for two unrelated segments). One beat: NaN and the
    beat itself; none: (NaN, empty)."""
    if not len(segments) or segments.shape[1] < 3:
        return np.nan, np.zeros(0)
    template = np.median(segments, axis=0)
    if len(segments) == 1:
        return np.nan, template
    a = segments - segments.mean(axis=1, keepdims=True)
    b = a[1] if len(segments) == 2 else template - template.mean()
    a = a[:1] if len(segments) == 2 else a
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum())
    r = np.divide((a * b).sum(axis=1), denom, out=np.zeros(len(a)), where=denom > 0)
    return float(np.clip(r.mean(), 0.0, 1.0)), template


def _accepted(beats: Beats, n_samples: int) -> Beats:
    """``beats`` if they pass the acceptance rule of the module docstring, else no beats;
    ``n_samples``: the length of the signal they were found in."""
    if len(beats.peaks) < 2:
        return Beats(beats.fs)
    median_ibi = np.median(np.diff(beats.peaks))
    if not np.isfinite(plausible_ms(median_ibi * 1000.0 / beats.fs)):
        return Beats(beats.fs)
    short = n_samples < (MIN_BEATS + 1) * median_ibi  # too short for MIN_BEATS whole beats
    enough = len(beats.peaks) >= (2 if short else MIN_BEATS)
    return beats if enough and beats.sqi >= MIN_SQI else Beats(beats.fs)


def upright(clean: np.ndarray, fs: float) -> np.ndarray:
    """The conditioned ECG with its QRS complexes pointing up: flipped when, in most 2 s
    windows, the sample of largest magnitude is negative (nk.ecg_invert's rule, on
    non-overlapping windows of the already conditioned signal: nk.ecg_invert filters again and
    slides its window over every sample, ~9 ms for a 15 s record)."""
    width = max(1, int(round(POLARITY_WINDOW_S * fs)))
    n = len(clean) // width * width or len(clean)
    windows = clean[:n].reshape(-1, min(width, n))
    extremes = windows[np.arange(len(windows)), np.abs(windows).argmax(axis=1)]
    return -clean if np.median(extremes) < 0 else clean


def ecg_beats(ecg, fs: float, mains_hz: Optional[float] = MAINS_HZ) -> Beats:
    """Accepted R peaks of a raw ECG row (conditioned here), with their template SQI."""
    x = _usable(ecg, fs)
    if x is None:
        return Beats(fs)
    clean = upright(condition(x, fs, "ecg", mains_hz), fs)
    with warnings.catch_warnings():  # "Mean of empty slice" where no QRS crosses its threshold
        warnings.simplefilter("ignore", RuntimeWarning)
        peaks = _neurokit().ecg_findpeaks(clean, sampling_rate=fs, method="neurokit")
    peaks = np.asarray(peaks["ECG_R_Peaks"], dtype=np.float64)
    beats = Beats(fs, peaks=peaks)
    ibi = beats.intervals_ms()
    if np.isfinite(ibi).any():
        length = int(round(np.nanmedian(ibi) * fs / 1000.0))
        beats.sqi, beats.template = template_sqi(_segments(clean, peaks - length // 2, length))
    return _accepted(beats, len(x))


def tangent_feet(clean: np.ndarray, peaks: np.ndarray, fs: float) -> np.ndarray:
    """Foot (sub-sample position) of each systolic peak by the intersecting-tangent method
    (module docstring); NaN where the pulse has no trough in its search window."""
    if not len(peaks):
        return np.zeros(0)
    peak = peaks.astype(int)
    # the trough lies after the previous peak, and at most the longest interval before the peak
    longest = int(IBI_RANGE_MS[1] * fs / 1000.0)
    start = np.maximum(np.concatenate([[0], peak[:-1]]), peak - longest)
    offsets = np.arange(int((peak - start).max()) + 1)
    window = clean[np.minimum(start[:, None] + offsets, len(clean) - 1)]
    inside = offsets <= (peak - start)[:, None]
    trough = np.where(inside, window, np.inf).argmin(axis=1)
    rows = np.arange(len(peak))
    # steepest rise window[j] -> window[j + 1] between the trough and the peak
    rising = (offsets[:-1] >= trough[:, None]) & inside[:, 1:]
    rise = np.where(rising, np.diff(window, axis=1), -np.inf)
    j = rise.argmax(axis=1)
    slope = rise[rows, j]
    mid = 0.5 * (window[rows, j] + window[rows, j + 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        feet = start + j + 0.5 - (mid - window[rows, trough]) / slope
    feet[(trough == 0) | (peak - start - trough < 2) | ~(slope > 0)] = np.nan
    return feet


def ppg_beats(ppg, fs: float) -> Beats:
    """Accepted systolic peaks and feet of a raw PPG row (conditioned here), with the template
    SQI and the median foot-aligned pulse."""
    x = _usable(ppg, fs)
    if x is None:
        return Beats(fs)
    clean = condition(x, fs, "ppg")
    try:
        peaks = _neurokit().ppg_findpeaks(clean, sampling_rate=fs, method="elgendi")["PPG_Peaks"]
    except IndexError:  # neurokit2's Elgendi detector indexes an empty array when no wave
        return Beats(fs)  # crosses its threshold
    peaks = np.asarray(peaks, dtype=np.float64)
    beats = Beats(fs, peaks=peaks, feet=tangent_feet(clean, peaks, fs))
    feet = beats.feet[np.isfinite(beats.feet)]
    f2f = plausible_ms(np.diff(feet) * (1000.0 / fs))
    if np.isfinite(f2f).any():
        length = int(round(np.nanmedian(f2f) * fs / 1000.0))
        pre = int(round(PRE_FOOT * length))
        beats.template_foot = pre
        rows = _segments(clean, feet - pre, pre + length + 1)
        beats.sqi, beats.template = template_sqi(rows)
        common = len(clean) - int(np.ceil(feet[1] - pre))
        if len(rows) == 1 and common >= rows.shape[1] // 2:  # the record ends in pulse 2
            beats.sqi = template_sqi(_segments(clean, feet[:2] - pre, common))[0]
    return _accepted(beats, len(x))


# ----------------------------------------------------------------------------- features
def rate_features(beats: Beats) -> Dict[str, float]:
    """Rate (bpm) and HRV (ms) from the accepted beats' intervals; NaN where too few."""
    ibi = beats.intervals_ms()
    kept = ibi[np.isfinite(ibi)]
    succ = np.diff(ibi)
    succ = succ[np.isfinite(succ)]  # both intervals kept
    return {"rate_bpm": 60000.0 / np.median(kept) if len(kept) else np.nan,
            "sdnn_ms": float(np.std(kept, ddof=1)) if len(kept) >= 2 else np.nan,
            "rmssd_ms": float(np.sqrt(np.mean(succ ** 2))) if len(succ) else np.nan}


def pat_features(ecg: Beats, ppg: Beats) -> Dict[str, float]:
    """Pulse arrival time from R peaks to the paired PPG feet and systolic peaks (ms)."""
    none = {"pat_foot_ms": np.nan, "pat_peak_ms": np.nan, "pat_beats": 0.0}
    has_foot = np.isfinite(ppg.feet)
    if not len(ecg.peaks) or not has_foot.any():
        return none
    r_s = ecg.peaks / ecg.fs
    foot_s, peak_s = ppg.feet[has_foot] / ppg.fs, ppg.peaks[has_foot] / ppg.fs
    idx = np.searchsorted(foot_s, r_s + PAT_RANGE_MS[0] / 1000.0, side="left")
    ok = idx < len(foot_s)
    r_s, idx = r_s[ok], idx[ok]
    ok = foot_s[idx] - r_s <= PAT_RANGE_MS[1] / 1000.0
    # a foot claimed by consecutive R peaks stays with the later (nearer) one
    ok &= np.append(idx[1:] != idx[:-1], True)
    r_s, idx = r_s[ok], idx[ok]
    if not len(idx):
        return none
    return {"pat_foot_ms": float(np.median(foot_s[idx] - r_s) * 1000.0),
            "pat_peak_ms": float(np.median(peak_s[idx] - r_s) * 1000.0),
            "pat_beats": float(len(idx))}


@functools.lru_cache(maxsize=16)
def _second_derivative(window: int) -> np.ndarray:
    """Cubic Savitzky-Golay second-derivative kernel (per sample squared) of ``window``
    samples; ``convolve1d`` with it is ``savgol_filter(.., deriv=2, mode="nearest")`` without
    refitting the kernel on every call."""
    return scipy.signal.savgol_coeffs(window, 3, deriv=2, use="conv")


def _apg_ratios(m: np.ndarray, fs: float, peak: int, end: int) -> Dict[str, float]:
    """b/a and d/a of the second derivative of the pulse ``m`` (module docstring)."""
    out = {"ppg_b_a": np.nan, "ppg_d_a": np.nan}
    window = max(5, int(round(APG_WINDOW_S * fs)) // 2 * 2 + 1)
    if len(m) < window:
        return out
    d2 = scipy.ndimage.convolve1d(m, _second_derivative(window), mode="nearest")
    a = int(np.argmax(d2[:peak + 1]))
    if d2[a] <= 0 or end - a < 3:
        return out
    b = a + int(np.argmin(d2[a:end]))
    out["ppg_b_a"] = d2[b] / d2[a]
    prominence = APG_PROMINENCE * d2[a]
    c = b + scipy.signal.find_peaks(d2[b:end], prominence=prominence)[0]
    d = c[0] + scipy.signal.find_peaks(-d2[c[0]:end], prominence=prominence)[0] if len(c) else []
    if len(d):
        out["ppg_d_a"] = d2[d[0]] / d2[a]
    return out


def _notch(m: np.ndarray, foot: int, peak: int, amp: float) -> Optional[tuple]:
    """(dicrotic notch, diastolic peak) sample indices of the pulse ``m``, or None."""
    tail = m[peak:foot + int(DIA_SEARCH * (len(m) - foot))]
    dia = scipy.signal.find_peaks(tail, prominence=NOTCH_PROMINENCE * amp)[0]
    if not len(dia):
        return None
    dia = peak + int(dia[0])
    notch = peak + int(np.argmin(m[peak:dia + 1]))
    return (notch, dia) if m[notch] > 0 else None


def _width(m: np.ndarray, level: float, peak: int) -> float:
    """Samples between the crossings of ``level`` before and after ``peak``; NaN if none."""
    up = np.flatnonzero(m[:peak] < level)
    down = np.flatnonzero(m[peak:] < level)
    if not len(up) or not len(down):
        return np.nan
    i, j = up[-1], peak + down[0] - 1
    return (j + (level - m[j]) / (m[j + 1] - m[j])) - (i + (level - m[i]) / (m[i + 1] - m[i]))


def ppg_morphology(template: np.ndarray, foot: int, fs: float) -> Dict[str, float]:
    """Morphology columns (module docstring; times in ms after the foot) of a median pulse
    whose sample ``foot`` is the foot and whose last sample is the next foot."""
    out = {c: np.nan for c in MORPHOLOGY_COLUMNS}
    n = len(template)
    if n - foot < 4:
        return out
    slope = (template[-1] - template[foot]) / (n - 1 - foot)
    m = template - (template[foot] + slope * (np.arange(n) - foot))  # foot-to-foot line = 0
    peak = foot + int(np.argmax(m[foot:]))
    amp = m[peak]
    if amp <= 0 or peak == foot:
        return out
    ms = 1000.0 / fs
    out["ppg_rise_time_ms"] = (peak - foot) * ms
    for q in (25, 50, 75):
        out[f"ppg_width{q}_ms"] = _width(m, amp * q / 100.0, peak) * ms
    rise, decay = np.clip(m[foot:peak + 1], 0, None), np.clip(m[peak:], 0, None)
    out["ppg_area_ratio"] = trapezoid(rise) / trapezoid(decay)
    found = _notch(m, foot, peak, amp)
    end = foot + (n - foot) // 2
    if found:
        end, dia = found
        out.update({"ppg_notch_ms": (end - foot) * ms, "ppg_notch_rel_height": m[end] / amp,
                    "ppg_reflection_index": m[dia] / amp})
    out.update(_apg_ratios(m, fs, peak, end))
    return out


def record_features(ecg, ppg, fs_ecg: float, fs_ppg: float,
                    mains_hz: Optional[float] = MAINS_HZ) -> Dict[str, float]:
    """Every ``FEATURE_COLUMNS`` entry of one record as a float (NaN: not computable; counts
    0). ``ecg``/``ppg``: raw 1-D rows over the same time span, either may be None; ``fs_*``:
    their rates (samples / record seconds); ``mains_hz``: the ECG notch (None: none)."""
    e, p = ecg_beats(ecg, fs_ecg, mains_hz), ppg_beats(ppg, fs_ppg)
    hr, pr = rate_features(e), rate_features(p)
    out = {"hr_bpm": hr["rate_bpm"], "hrv_sdnn_ms": hr["sdnn_ms"],
           "hrv_rmssd_ms": hr["rmssd_ms"], **pat_features(e, p), "sqi_ecg": e.sqi,
           "sqi_ppg": p.sqi, "n_beats_ecg": float(len(e.peaks)),
           "n_beats_ppg": float(len(p.peaks)), "ppg_rate_bpm": pr["rate_bpm"],
           **ppg_morphology(p.template, p.template_foot, fs_ppg)}
    return {c: float(out[c]) for c in FEATURE_COLUMNS}
